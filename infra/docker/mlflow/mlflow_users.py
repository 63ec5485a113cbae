"""The MLflow server's users (its `basic-auth` app): a writer for the jobs, a read-only user for consumers.

Run as the admin once the server is up, and again after a password rotation; it is idempotent:

    MLFLOW_TRACKING_URI=http://... MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    MLFLOW_WRITER_USERNAME=... MLFLOW_WRITER_PASSWORD=... MLFLOW_READER_USERNAME=... MLFLOW_READER_PASSWORD=... \\
    python mlflow_users.py --models wuerstchen-stage-c,wuerstchen-decoders --experiments wuerstchen-stage-c

The server's `default_permission` (basic_auth.ini) is READ: every user, the reader included, reads
everything, and anonymous requests are refused. The writer gets MANAGE on the registered models and the
experiments the jobs write to (and on the Default experiment, where `wuerstchen register
--decoder-bundle` logs). The script creates those first, as the admin, so that no other user can create
one of them and own it. It lives in the MLflow image, which holds no project code: names are arguments.
Exit codes: 0 done, 2 a missing setting, 1 failed.
"""

import argparse
import os
import sys

WRITER, READER = "MLFLOW_WRITER", "MLFLOW_READER"
DEFAULT_EXPERIMENT_ID = "0"


def _credentials(prefix: str) -> tuple[str, str]:
    names = (f"{prefix}_USERNAME", f"{prefix}_PASSWORD")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise KeyError(f"{' and '.join(missing)} not set: pass them from the Secret wuerstchen-mlflow-auth")
    return os.environ[names[0]], os.environ[names[1]]


def ensure_user(auth, username: str, password: str) -> None:
    """Creates the user, or sets its password when it exists (a rotation)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(username, password)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.update_user_password(username, password)
    if auth.get_user(username).is_admin:
        raise ValueError(f"user {username} is an admin: the job and consumer users must not be")


def grant_manage(auth, username: str, resource_type: str, resource_id: str) -> None:
    current = auth.get_user_permission(username, resource_type, resource_id)
    if getattr(current, "permission", None) == "MANAGE":
        return
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, "MANAGE")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, "MANAGE")


def setup(tracking_uri: str, models: list[str], experiments: list[str]) -> dict:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    writer, writer_password = _credentials(WRITER)
    reader, reader_password = _credentials(READER)
    if writer == reader:
        raise ValueError(f"the writer and the reader are the same user {writer!r}: give them different names")
    # The registry explicitly too: MLFLOW_REGISTRY_URI in the environment would send the models elsewhere.
    auth, client = AuthServiceClient(tracking_uri), MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ensure_user(auth, writer, writer_password)
    ensure_user(auth, reader, reader_password)
    for name in models:
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        grant_manage(auth, writer, "registered_model", name)
    experiment_ids = [DEFAULT_EXPERIMENT_ID]
    for name in experiments:
        found = client.get_experiment_by_name(name)
        experiment_ids.append(found.experiment_id if found else client.create_experiment(name))
    for experiment_id in experiment_ids:
        grant_manage(auth, writer, "experiment", experiment_id)
    return {"writer": writer, "reader": reader, "models": models, "experiment_ids": experiment_ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated registered model names the writer manages")
    parser.add_argument("--experiments", required=True, help="comma-separated experiment names the writer manages")
    args = parser.parse_args(argv)
    # MLflow's client retries a failing call with backoff for minutes; the Job retries the whole script
    # instead, and a failing call is reported at once.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        if not uri or not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            raise KeyError("MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the admin) "
                           "must be set")
        done = setup(uri, [m for m in args.models.split(",") if m], [e for e in args.experiments.split(",") if e])
    except (KeyError, ValueError) as err:
        print(f"mlflow_users: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(f"mlflow_users: writer {done['writer']} manages models {done['models']} and experiments "
          f"{done['experiment_ids']}; reader {done['reader']} reads (default permission)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
