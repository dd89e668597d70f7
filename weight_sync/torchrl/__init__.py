"""weight-sync inside torchrl's own collectors: a torchrl ``WeightSyncScheme``.

:class:`WeightSyncTorchRLScheme` plugs into ``MultiSyncCollector``,
``MultiaSyncCollector`` and ``DistributedCollector`` through their
``weight_sync_schemes`` argument; the weights travel over weight-sync's own machinery
(one packed message per version, any registered transport, typed bounded waits)::

    from torchrl.collectors import MultiSyncCollector
    from weight_sync.torchrl import WeightSyncTorchRLScheme

    scheme = WeightSyncTorchRLScheme(transport="shm")      # or "distributed", or yours
    collector = MultiSyncCollector([make_env] * 2, policy, frames_per_batch=256,
                                   total_frames=-1, track_policy_version=True,
                                   weight_sync_schemes={"policy": scheme})
    for batch in collector:
        train(policy, batch)                 # in place: optimizer steps
        collector.update_policy_weights_()   # snapshot, send, every worker applied it
    collector.shutdown()
    scheme.shutdown()                        # torchrl's collectors do not shut schemes down

How it maps onto torchrl (0.14):

* ``init_on_sender`` (learner, before the workers are pickled) builds the
  :class:`~weight_sync.WeightSender` (one for all workers, or one per worker with
  ``per_worker_senders=True``); only their small :class:`~weight_sync.ConnectionInfo`
  is pickled into the workers (:meth:`WeightSyncTorchRLScheme.__getstate__`).
* ``connect`` on the learner is the senders' ``connect`` (rendezvous, layout check,
  initial sync), watching the worker processes so that one that dies while starting is
  reported at once, naming it. On a worker, ``connect`` builds a
  :class:`~weight_sync.WeightReceiver` on the worker's policy (meta tensors, as torchrl
  sends them, are first given real storage) and returns once the policy holds the
  learner's weights; a background thread then applies every later version, because
  torchrl's multi-process worker loop never calls ``receive()``.
* ``send`` (``collector.update_policy_weights_()``) snapshots the weights and returns
  once every targeted worker applied them, else raises ``CollectorFailed`` (naming the
  worker) or ``WeightSyncTimeout``. It never waits on the worker's rollout loop.
* Versions: worker *w*'s torchrl ``policy_version`` (its ``PolicyVersion`` transform,
  i.e. the ``"policy_version"`` of its frames) equals :attr:`versions` ``[w]``: 0 after
  the initial sync, +1 per update that reached it.

The torchrl-named transport methods (``send_weights``, ``receive_weights``,
``setup_connection_and_weights_on_sender`` / ``_on_receiver``, ``send_ack``...) live
here only, on :class:`LearnerEnd` and :class:`WorkerEnd`.

This module imports torchrl; ``import weight_sync`` does not import this module.
"""

from weight_sync.torchrl.ends import LearnerEnd, WorkerEnd
from weight_sync.torchrl.gate import PolicyGate
from weight_sync.torchrl.scheme import WeightSyncTorchRLScheme

__all__ = ["LearnerEnd", "PolicyGate", "WeightSyncTorchRLScheme", "WorkerEnd"]
