"""Bundle-local code of sst_brain_mri_one_shot_segmentation: none needed; the stages live in common.engines.sst."""
