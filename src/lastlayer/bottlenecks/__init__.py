"""The bottleneck cache: keys, part files, Spark staging, the store, a run's needs and streamed passes."""
