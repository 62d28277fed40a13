"""Training here, so that quality and attention findings come from models that learned
something: real datasets read from installed packages (datasets), each family's objective
(objectives), the resumable data-parallel harness (harness) and the equal-compute study
(study, study_report, study_plots)."""
