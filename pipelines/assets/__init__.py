"""One module per stage group; `pipelines.definitions` collects their assets, checks, jobs and sensors."""
