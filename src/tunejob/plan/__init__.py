"""Plan: what a job will cost before it runs: tokens, dollars, memory, time, trainable parameters,
and their text renderings. Sits above train because it predicts what training will do (its batch
layout, targets and model); imports train, data, monitor and the foundation."""
