"""The learner's side: :class:`~weight_sync.learner.sender.WeightSender`, its links to
collectors, admission of joins, publishing of versions, and the data-parallel door."""
