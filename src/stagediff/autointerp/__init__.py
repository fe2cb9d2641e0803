"""Auto-interp of the selected features (paper §5.1, A.7–A.8): examples, describe, validate."""
