"""The Celery app of this project's workers: dagster-celery's own (`dagster_celery.app`: its tasks,
and its settings from `-y deploy/celery/worker.yaml`), with the code location imported first.

    dagster-celery worker start -A crm_assets.celery_app -y deploy/celery/worker.yaml -n w1

Celery imports this module in the worker's main process, then forks its pool processes, which
start with the code imported: with `-A dagster_celery.app` each pool process imported it on its
first run, once per process rather than once per worker. Importing the code location opens no
connection and no file, so it is safe before the fork.
"""

from dagster_celery.app import app, execute_job, execute_plan, resume_job

import crm_assets.definitions  # noqa: F401  (imported before the fork; see above)

__all__ = ["app", "execute_job", "execute_plan", "resume_job"]
