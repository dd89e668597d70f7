"""weight-sync inside torchrl's own collectors: a torchrl ``WeightSyncScheme``.

:class:`WeightSyncTorchRLScheme` plugs into torchrl's unified
``Collector(..., num_collectors=K, sync=True|False)``, ``MultiSyncCollector``,
``MultiAsyncCollector`` and ``DistributedCollector`` through their
``weight_sync_schemes`` argument; the weights travel over weight-sync's own machinery
(one packed message per version, any registered transport, typed bounded waits)::

    from torchrl.collectors import Collector
    from weight_sync.torchrl import WeightSyncTorchRLScheme

    scheme = WeightSyncTorchRLScheme()                     # or transport="shm", ...
    collector = Collector(make_env, policy=policy, num_collectors=2, sync=True,
                          frames_per_batch=256, total_frames=-1,
                          track_policy_version=True,
                          weight_sync_schemes={"policy": scheme})
    for batch in collector:
        train(policy, batch)                 # in place: optimizer steps
        collector.update_policy_weights_()   # snapshot, send, every worker applied it
    collector.shutdown()
    scheme.shutdown()                        # torchrl's collectors do not shut schemes down

How it maps onto torchrl (0.14):

* ``init_on_sender`` (learner, before the workers are pickled) builds one
  :class:`~weight_sync.WeightSender` for all workers, from the model at the scheme's
  key (``"policy"``, or a path such as ``"env.transform[0].module"``, resolved as
  torchrl resolves it, else the scheme's ``weights=``); only its small
  :class:`~weight_sync.ConnectionInfo` is pickled into the workers
  (:meth:`WeightSyncTorchRLScheme.__getstate__`). A weightless policy
  (``RandomPolicy``) builds nothing; a single in-process ``Collector`` is refused.
* ``connect`` on the learner is the senders' ``connect`` (rendezvous, layout check,
  initial sync), watching the worker processes so that one that dies while starting is
  reported at once, naming it. On a worker, ``connect`` builds a
  :class:`~weight_sync.WeightReceiver` on the worker's policy (meta tensors, as torchrl
  sends them, are first given real storage) and returns once the policy holds the
  learner's weights; a background thread then applies every later version, because
  torchrl's multi-process worker loop never calls ``receive()``.
* ``send`` (``collector.update_policy_weights_()``) snapshots the weights and returns
  once every targeted worker applied them (``worker_ids``: those only,
  :meth:`~weight_sync.WeightSender.send_weights_async` ``collectors=``), else raises
  ``CollectorFailed`` (naming the worker) or ``WeightSyncTimeout``. It never waits on
  the worker's rollout loop.
* Versions: worker *w*'s torchrl ``policy_version`` (its ``PolicyVersion`` transform,
  i.e. the ``"policy_version"`` of its frames) equals :attr:`versions` ``[w]``: 0 after
  the initial sync, then the sender's version of each update that reached it (one
  counter for all workers, so a tag names one set of weights).

The torchrl-named transport methods (``send_weights``, ``receive_weights``,
``setup_connection_and_weights_on_sender`` / ``_on_receiver``, ``send_ack``...) live
here only, on :class:`LearnerEnd` and :class:`WorkerEnd`.

This module imports torchrl; ``import weight_sync`` does not import this module.
"""

from weight_sync.torchrl.ends import LearnerEnd, WorkerEnd
from weight_sync.torchrl.gate import PolicyGate
from weight_sync.torchrl.scheme import WeightSyncTorchRLScheme

__all__ = ["LearnerEnd", "PolicyGate", "WeightSyncTorchRLScheme", "WorkerEnd"]
