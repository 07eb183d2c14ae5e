"""Bundle-only glue of global_local_contrastive_cardiac_mri_segmentation (everything reusable lives in ``common``)."""
