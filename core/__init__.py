"""The foundation every job stands on, free of Ray, MLflow and the models: storage URLs
(`core.storage`, the only module that knows about filesystems), validated configs (`core.config`),
and connecting a job to its Ray cluster (`core.ray_cluster`, which imports Ray only when called)."""
