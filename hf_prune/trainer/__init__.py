"""Pruning during training: the callback base and its protocol (:mod:`.callback`), what callbacks read from
a Trainer and write into its checkpoints (:mod:`.state`), staged fine-tuning (:mod:`.staged`), distillation from
the dense model (:mod:`.distill`) and learning-rate restarts at pruning steps (:mod:`.restarts`)."""
