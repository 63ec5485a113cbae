"""The files MLflow logs as "models from code": each builds one pyfunc model of
`pipelines.pyfunc_models`, so that no pickled object ever goes into the registry."""
