"""`rayattr validate`: does a run's values predict what retraining would do?

    from rayattr.validate import validate_run
    result = validate_run("./rayattr_runs/run-…", subsets=16, fraction=0.1, sources=True)
    result.summary["lds"], result.summary["source_spearman"]

Retrains the run's own trajectory with chosen occurrences removed (loss weight 0, everything
else identical: the trajectory-specific leave-out the values estimate) and compares each
retrain's change of the validation loss with the sum of the removed occurrences' values.
Writes validation/{subsets,sources,occurrences}.parquet and validation/summary.json into the
run (schema in docs/method.md, "Validation").
"""

from rayattr.validate.counterfactuals import Removal
from rayattr.validate.errors import ValidationError
from rayattr.validate.validation import SCHEMA_VERSION, ValidationResult, read_validation, validate_run

__all__ = ["Removal", "SCHEMA_VERSION", "ValidationError", "ValidationResult", "read_validation", "validate_run"]
