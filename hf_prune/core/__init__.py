"""Shared pieces with one home each: input conventions (:mod:`.inputs`), how models are run
(:mod:`.execution`), argument checks (:mod:`.checks`), processes (:mod:`.distributed`), the method
record written onto a pruned model (:mod:`.record`) and pruning schedules (:mod:`.schedules`)."""
