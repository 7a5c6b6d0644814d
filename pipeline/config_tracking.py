"""The `tracking` section of the run config: MLflow, and the report written after each run."""

from __future__ import annotations

from pydantic import Field

from pipeline.config_errors import Section


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Record the run in MLflow.")
    mlflow_uri: str | None = Field(
        None, description="Tracking URI; null: MLFLOW_TRACKING_URI, else a sqlite file in output_dir. Give "
        "credentials as MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD; userinfo in the URI (user:pass@) "
        "is kept only in RUN_DIR/tracking/credentials.json (0600) and redacted everywhere else.")
    experiment: str | None = Field(
        None, description="MLflow experiment; null: MLFLOW_EXPERIMENT_NAME, else 'ftpipe'.")
    report: bool = Field(
        True, description="After each run, write RUN_DIR/report/ (plots, report.html) and log it to MLflow.")
