"""Work on files: training, offline scoring, evaluation, explanation reports."""
