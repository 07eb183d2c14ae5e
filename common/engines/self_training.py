"""Cyclical self-training of a feature extractor ``g`` through a differentiable optimiser (Bigalke et al., MICCAI 2023).

One epoch of :class:`CyclicalSelfTrainer` is one **stage** (1000 iterations in the paper). Before stage ``s`` starts,
the pseudo-label bank must hold stage ``s - 1`` labels:

* stage-0 labels come from a randomly initialised ``g_A`` (seeded, PyTorch default init, BatchNorm in eval mode with
  fresh statistics), independent of the learner ``g_B`` that is trained;
* later labels come from the current ``g`` in eval mode. One pass of the pseudo-label pipeline per pair gives both the
  field without Adam and the Adam-refined target (the reference runs two passes for the same numbers); their
  disagreement is the pair's difficulty, which drives :class:`~common.engines.pseudo_labels.AgreementSampler`.

An iteration (learning stream): pairs drawn by agreement, asymmetric random affine augmentation with the transformed
target (``common.engines.pair_augment``), ``g`` in train mode with separate fixed/moving calls, plain ``h`` (one warp,
no ICE), mean endpoint error to the target (``common.engines.pseudo_labels.endpoint_error``). The optimizer's moments
are reset every ``optimizer_reset_stages`` stages (the reference's "repeats"); the cosine warm restarts come from the
scheduler handler in the config. Metric supervision (``supervision="ncc"`` or ``"mind"``) trains the same network and
optimiser on an image similarity instead, as the paper's baselines.

Resume after a kill: the bank lives on disk with one atomically written file per pair and the stage that produced it;
the refresh runs at EPOCH_STARTED (after `common.engines.checkpoint.ResumableCheckpointHandler` restored the run at
STARTED), skips pairs already done for that stage and never repeats after the last stage.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import decollate_batch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer
from monai.utils import CommonKeys as Keys
from torch.utils.data import Dataset

from common.distributed import gather_rows, is_rank0, shard
from common.engines.pair_augment import affine_pair_augment
from common.engines.progress import progress
from common.engines.pseudo_labels import PrealignmentStore, PseudoLabelBank, endpoint_error, pair_difficulty
from common.engines.registration_eval import pair_metrics
from common.io import atomic_json_dump, atomic_torch_save
from common.registration import fields
from common.registration.affine import affine_ddf
from common.registration.convex import rescale_field
from common.registration.cst_pipeline import CSTRegistrationNet, register_pair
from common.registration.instance_opt import diffusion_regulariser
from common.registration.similarity import SIMILARITIES

__all__ = ["ImagePairDataset", "CyclicalSelfTrainer", "SUPERVISIONS"]

logger = logging.getLogger(__name__)

SUPERVISIONS = ("pseudo_label", "ncc", "mind")
_METRICS = {"ncc": "lncc", "mind": "mind"}


class ImagePairDataset(Dataset):
    """Pairs over an indexable dataset of preprocessed images (e.g. a ``CacheDataset``): each image is loaded and
    transformed once however many pairs use it.

    Item ``k`` is ``{"moving_image", "fixed_image", "pair_index": k}`` plus ``moving_label``/``fixed_label`` when the
    images carry ``label_key``. ``pairs`` are ``(moving, fixed)`` indices (``common.data.pairs`` convention).

    With a ``prealignment`` store (affine pre-alignment), the moving image (linear) and label (nearest neighbour) of
    each item are resampled by the pair's stored affine matrix, so both the pseudo-label and the learning stream see
    the aligned pair; :meth:`compute_prealignment` must have filled the store first.
    """

    def __init__(
        self,
        dataset: Any,
        pairs: Sequence[Sequence[int]],
        image_key: str = "image",
        label_key: str = "label",
        prealignment: PrealignmentStore | None = None,
    ) -> None:
        n = len(dataset)
        bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n)]
        if bad:
            raise ValueError(f"pairs {bad[:5]} index outside the {n} images")
        self.dataset, self.pairs = dataset, [tuple(int(i) for i in p) for p in pairs]
        self.image_key, self.label_key = image_key, label_key
        self.prealignment = prealignment

    def compute_prealignment(self, fit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device=None) -> int:
        """Fill the store: ``fit(moving [1, 1, *S], fixed [1, 1, *S]) -> matrix [1, D, D+1]`` for every pair whose
        matrix is missing (a resumed run computes only those). Returns the number of pairs computed."""
        if self.prealignment is None:
            raise ValueError("compute_prealignment needs a PrealignmentStore (ImagePairDataset(prealignment=...))")
        computed = []
        # distributed: each rank fits its share, then all see every matrix
        for k in progress(shard(range(len(self.pairs))), "affine pre-alignment"):
            pair = self.pairs[k]
            if self.prealignment.get(k, pair) is not None:
                continue
            moving, fixed = (_plain(self.dataset[i][self.image_key])[None].to(device, torch.float32) for i in pair)
            self.prealignment.put(k, pair, fit(moving, fixed)[0])
            computed.append(k)
        self.prealignment.share(computed)
        return len(gather_rows(computed))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        moving_index, fixed_index = self.pairs[index]
        moving, fixed = self.dataset[moving_index], self.dataset[fixed_index]
        item = {"moving_image": moving[self.image_key], "fixed_image": fixed[self.image_key], "pair_index": index}
        if self.label_key in moving and self.label_key in fixed:
            item["moving_label"], item["fixed_label"] = moving[self.label_key], fixed[self.label_key]
        if self.prealignment is not None:
            matrix = self.prealignment.get(index, self.pairs[index])
            if matrix is None:
                raise RuntimeError(f"pair {index} {self.pairs[index]} has no pre-alignment: call compute_prealignment")
            image = _plain(item["moving_image"]).float()
            ddf = affine_ddf(matrix, image.shape[1:])
            item["moving_image"] = fields.warp(image[None], ddf)[0]
            if "moving_label" in item:
                item["moving_label"] = fields.warp_labels(_plain(item["moving_label"])[None], ddf)[0]
        return item


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def random_init_copy(network: CSTRegistrationNet, seed: int) -> CSTRegistrationNet:
    """Copy of ``network`` whose feature net is re-initialised (PyTorch defaults, fresh BatchNorm statistics) from
    ``seed`` without touching the global random state: the stage-0 network ``g_A``."""
    other = copy.deepcopy(network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in other.feature_net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return other.eval()


class CyclicalSelfTrainer(SupervisedTrainer):
    """Trainer of cyclical self-training; a MONAI ``SupervisedTrainer`` so bundle handlers and MLflow work unchanged.

    ``state.output`` is a list with one dict (image, pred, loss) per pair of the batch, each holding the batch loss.

    Affine pre-alignment: when ``network.affine_prealign`` is set, ``pair_dataset`` must carry a ``PrealignmentStore``;
    the matrices are computed when the run starts (missing pairs only) and both streams work on the aligned pairs, so
    pseudo labels and predictions are residual fields after the affine step.

    Args (beyond ``SupervisedTrainer``'s ``device``, ``max_epochs`` (= stages), ``train_data_loader``, ``network``,
    ``optimizer``, ``epoch_length``, ``train_handlers``, ``amp``, ``key_train_metric``):
        bank: the pseudo-label bank (needed for ``supervision="pseudo_label"``).
        pair_dataset: dataset of all training pairs (``ImagePairDataset``); default ``train_data_loader.dataset``.
        supervision: "pseudo_label" (self-training), "ncc" (local NCC) or "mind" (MIND-SSC) metric supervision.
        target_factor: pseudo labels and the learning-stream field live on the image grid divided by this (2).
        refine_pseudo_labels: ICE, second warp and Adam in the pseudo-label stream (False: plain ``h``, the
            "w/o PL refinement" ablation, which also disables difficulty weighting).
        pl_num_warps, pl_use_ice, pl_use_adam, pl_reg_fac, adam_iterations, adam_channels, adam_feature_scale,
            adam_return_prestep: settings of the pseudo-label stream (paper: 2, True, True, 1, 50, 32, 5, True).
        pl_seed: seed of the per-pair random Adam projections (pair ``k`` of stage ``s`` uses ``pl_seed + s*P + k``).
        stage0_seed: seed of ``g_A``.
        augment, aug_strengths, aug_label_transform: learning-stream augmentation ("ref" or "exact" target).
        clamp_train_inputs: clamp the learning-stream images as the pseudo-label stream (False = reference, Q4).
        loss_crop, loss_weight: endpoint-error crop (target-grid voxels) and constant factor (8, 1.5).
        metric_reg_weight: weight of the diffusion regulariser of metric supervision.
        optimizer_reset_stages: reset the optimizer moments every this many stages (4; 0 = never).
        stage_dir: where ``stage_XX.pt`` (state dict of ``g`` after each stage; ``stage_00.pt`` = ``g_A``) and
            ``stage_history.json`` (per-stage pseudo-label statistics) are written.
        labels: ``{id: name}``; when the pairs carry labels, the pseudo labels' Dice is logged per stage (monitoring
            only: labels never enter training).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        network: CSTRegistrationNet,
        optimizer: torch.optim.Optimizer,
        bank: PseudoLabelBank | None = None,
        pair_dataset: Dataset | None = None,
        supervision: str = "pseudo_label",
        epoch_length: int | None = None,
        inferer=None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        postprocessing=None,
        amp: bool = False,
        target_factor: int = 2,
        refine_pseudo_labels: bool = True,
        pl_num_warps: int = 2,
        pl_use_ice: bool = True,
        pl_use_adam: bool = True,
        pl_reg_fac: float = 1.0,
        adam_iterations: int = 50,
        adam_channels: int = 32,
        adam_feature_scale: float = 5.0,
        adam_return_prestep: bool = True,
        pl_seed: int = 0,
        stage0_seed: int = 12345,
        augment: bool = True,
        aug_strengths: Sequence[float] = (0.075, 0.05),
        aug_label_transform: str = "ref",
        clamp_train_inputs: bool = False,
        loss_crop: int = 8,
        loss_weight: float = 1.5,
        metric_reg_weight: float = 1.0,
        optimizer_reset_stages: int = 4,
        stage_dir: str | Path | None = None,
        labels: Mapping[int | str, str] | None = None,
    ) -> None:
        if supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {supervision!r}")
        if supervision == "pseudo_label" and bank is None:
            raise ValueError("pseudo-label supervision needs a PseudoLabelBank")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=endpoint_error,
            epoch_length=epoch_length,
            inferer=inferer if inferer is not None else SimpleInferer(),
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            train_handlers=train_handlers,
            amp=amp,
            decollate=False,
        )
        self.bank = bank
        self.pair_dataset = pair_dataset if pair_dataset is not None else train_data_loader.dataset
        self.supervision = supervision
        self.target_factor = int(target_factor)
        self.pl_kwargs = dict(
            num_warps=pl_num_warps if refine_pseudo_labels else 1,
            use_ice=pl_use_ice if refine_pseudo_labels else False,
            use_adam=pl_use_adam if refine_pseudo_labels else False,
            reg_fac=float(pl_reg_fac),
            adam_iterations=int(adam_iterations),
            adam_channels=int(adam_channels),
            adam_feature_scale=float(adam_feature_scale),
            adam_return_prestep=bool(adam_return_prestep),
        )
        self.pl_seed, self.stage0_seed = int(pl_seed), int(stage0_seed)
        self.augment, self.aug_strengths = bool(augment), tuple(float(s) for s in aug_strengths)
        self.aug_label_transform = aug_label_transform
        self.clamp_train_inputs = bool(clamp_train_inputs)
        self.loss_crop, self.loss_weight = int(loss_crop), float(loss_weight)
        self.metric_reg_weight = float(metric_reg_weight)
        self.optimizer_reset_stages = int(optimizer_reset_stages)
        self.stage_dir = None if stage_dir is None else Path(stage_dir)
        self.labels = None if labels is None else {int(k): v for k, v in labels.items() if int(k) != 0}
        if network.affine_prealign != (getattr(self.pair_dataset, "prealignment", None) is not None):
            raise ValueError(
                "affine_prealign is set on the network but the pair dataset has no PrealignmentStore (or the reverse): "
                "pass both or neither (config ids affine_prealign and train#pair_dataset#prealignment)"
            )
        if network.affine_prealign:
            self.add_event_handler(Events.STARTED, self._prealign_pairs)
        self.add_event_handler(Events.EPOCH_STARTED, self._start_stage)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._save_stage)

    def _prealign_pairs(self, engine: SupervisedTrainer) -> None:
        """Affine pre-alignment of every training pair, once (stored matrices are reused after a restart)."""
        start = time.perf_counter()
        computed = self.pair_dataset.compute_prealignment(self.network.prealign, engine.state.device)
        logger.info("affine pre-alignment: %d pair(s) computed in %.1f s", computed, time.perf_counter() - start)

    # -- stage boundaries --------------------------------------------------------------------------------------------

    def _start_stage(self, engine: SupervisedTrainer) -> None:
        stage = engine.state.epoch - 1  # stages completed so far
        at_stage_start = engine.state.iteration == stage * engine.state.epoch_length
        reset = self.optimizer_reset_stages
        if at_stage_start and stage > 0 and reset > 0 and stage % reset == 0:
            self.optimizer.state.clear()
            if self.scaler is not None:
                self.scaler = torch.amp.GradScaler("cuda")
            logger.info("stage %d: optimizer moments reset", stage + 1)
        if self.supervision == "pseudo_label" and self.bank.stage < stage:
            self.refresh_pseudo_labels(stage)

    def _save_stage(self, engine: SupervisedTrainer) -> None:
        if self.stage_dir is not None and is_rank0():
            state = self.network.feature_net.state_dict()
            atomic_torch_save(state, self.stage_dir / f"stage_{engine.state.epoch:02d}.pt")

    def refresh_pseudo_labels(self, stage: int) -> None:
        """Compute the stage-``stage`` bank: ``g_A`` for stage 0, the current network otherwise (eval mode).

        Distributed runs split the pairs round-robin over the ranks (`common.distributed.shard`) and then share them
        (`PseudoLabelBank.share`), so every rank trains on the same bank. Pair ``k``'s Adam seed depends on ``k`` and
        the stage only, and every rank holds the same weights, so the bank equals a single process's.
        """
        network = random_init_copy(self.network, self.stage0_seed) if stage == 0 else self.network
        if stage == 0 and self.stage_dir is not None and is_rank0():
            atomic_torch_save(network.feature_net.state_dict(), self.stage_dir / "stage_00.pt")
        start = time.perf_counter()
        num_pairs = len(self.pair_dataset)
        computed, magnitudes, dices = [], [], []
        for k in progress(shard(range(num_pairs)), f"pseudo labels, stage {stage}"):
            if self.bank.stage_of(k) == stage:
                continue
            item = self.pair_dataset[k]
            fixed = _plain(item["fixed_image"])[None].to(self.state.device, torch.float32)
            moving = _plain(item["moving_image"])[None].to(self.state.device, torch.float32)
            generator = torch.Generator().manual_seed(self.pl_seed + stage * num_pairs + k)
            result = register_pair(network, moving, fixed, generator=generator, **self.pl_kwargs)
            grid = [n // self.target_factor for n in fixed.shape[2:]]
            refined = rescale_field(result.ddf, grid)
            plain = rescale_field(result.pre_adam, grid)
            difficulty = float(pair_difficulty(plain, refined, self.target_factor, self.loss_crop, self.loss_weight))
            self.bank.put(k, refined[0], difficulty, stage)
            computed.append(k)
            magnitudes.append(float(result.ddf.norm(dim=1).mean()))
            if self.labels and "fixed_label" in item:
                summary = pair_metrics(item["fixed_label"], item["moving_label"], result.ddf, self.labels)[1]
                dices.append(summary["dice"])
        self.bank.share(computed)
        self.bank.complete(stage)
        magnitudes, dices = gather_rows(magnitudes), gather_rows(dices)
        record = {
            "stage": stage,
            "seconds": time.perf_counter() - start,
            "pairs_computed": len(magnitudes),
            "mean_displacement_voxels": float(np.mean(magnitudes)) if magnitudes else None,
            "mean_difficulty": float(np.mean(self.bank.difficulty)),
        }
        if dices:
            record["pseudo_label_dice"] = float(np.nanmean(dices))
        logger.info("pseudo labels of stage %d: %s", stage, record)
        if self.stage_dir is not None and is_rank0():
            history_file = self.stage_dir / "stage_history.json"
            history = json.loads(history_file.read_text()) if history_file.is_file() else []
            atomic_json_dump([h for h in history if h["stage"] != stage] + [record], history_file)

    # -- learning stream ---------------------------------------------------------------------------------------------

    def _loss(self, moving: torch.Tensor, fixed: torch.Tensor, pair_index: torch.Tensor) -> tuple[torch.Tensor, Any]:
        grid = [n // self.target_factor for n in fixed.shape[2:]]
        network: CSTRegistrationNet = self.network
        if self.supervision == "pseudo_label":
            target = self.bank.load(pair_index).to(fixed.device)
            if self.augment:
                fixed, moving, target = affine_pair_augment(
                    fixed, moving, target, self.aug_strengths, self.aug_label_transform
                )
            if self.clamp_train_inputs:
                fixed, moving = network.clamp(fixed), network.clamp(moving)
            pred = network.predict(moving, fixed, grid)
            loss = self.loss_function(pred, target, self.target_factor, self.loss_crop, self.loss_weight)
            return loss, pred
        if self.augment:
            fixed, moving, _ = affine_pair_augment(fixed, moving, None, self.aug_strengths)
        fixed, moving = network.clamp(fixed), network.clamp(moving)
        pred = network.predict(moving, fixed, grid)
        warped = fields.warp(moving, rescale_field(pred, fixed.shape[2:]))
        descriptor, similarity = SIMILARITIES[_METRICS[self.supervision]]
        if descriptor is not None:
            warped, fixed = descriptor(warped), descriptor(fixed)
        loss = similarity(warped, fixed).mean() + self.metric_reg_weight * diffusion_regulariser(pred).mean()
        return loss, pred

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        fixed = _plain(batchdata["fixed_image"]).to(device=device, dtype=torch.float32)
        moving = _plain(batchdata["moving_image"]).to(device=device, dtype=torch.float32)
        pair_index = torch.as_tensor(batchdata["pair_index"])
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        loss, pred = self._loss(moving, fixed, pair_index)
        engine.state.output = {Keys.IMAGE: fixed, Keys.PRED: pred, Keys.LOSS: loss}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        # decollated as MONAI's default trainers do, so `from_engine(["loss"], first=True)` (MLflow) reads the loss
        engine.state.output = decollate_batch(engine.state.output, detach=True)
        return engine.state.output
