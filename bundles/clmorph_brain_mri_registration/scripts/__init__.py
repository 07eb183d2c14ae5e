"""Bundle-only glue for clmorph_brain_mri_registration (the implementation lives in the shared `common` package)."""
