"""The control plane: the one module that reads and writes the store (:mod:`.channel`),
the store server, liveness, and discovery of a learner from the environment."""
