"""Config overrides that make the hybrid small enough for tests on a 2-core machine.

``TINY_NETWORK`` shrinks the network and gives Ray Train and XGBoost workers half a CPU each (so Ray Data's tasks
still get one); ``TINY`` adds a short training, few boosting rounds and the entries task. Later overrides win, so a
test adds its own after these.
"""

TINY_NETWORK = [
    "model.d_model=8",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.cnn_channels=8",
    "model.cnn_layers=2",
    "train.cpus_per_worker=0.5",
    "head.cpus_per_worker=0.5",
]

TINY = [
    *TINY_NETWORK,
    "train.batch_size=64",
    "train.epochs=2",
    "head.num_boost_round=30",
    "evaluation.task=entries",
]
