"""Monitor: the metric record stream and its sinks, the live and `watch` views, the pure
diagnosis of loss curves, and the report. The lowest stage: imports only spec/errors/catalog,
since training writes the stream."""
