"""Pruning during training: the callback base and its protocol (:mod:`.callback`), what callbacks read from
a Trainer and write into its checkpoints (:mod:`.state`), and staged fine-tuning (:mod:`.staged`)."""
