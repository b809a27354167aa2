"""OpenAI's fine-tuning API on the registry: /v1/files, /v1/fine_tuning/jobs and the worker that
runs `loraplex train` for each queued job."""
