"""A collector's side: :class:`~weight_sync.collector.receiver.WeightReceiver`, its link to
the learner, attachment and re-attachment, and applying versions into the policy."""
