"""SST stages (Tomar et al., WACV 2022) as MONAI trainers plus the non-training stages as functions.

Stage map (spec section 1; every stage writes one file, atomically, that the next loads and that ``run_stages`` uses
to skip finished stages):

* S0 ``RegistrationPretrainTrainer`` - spatial transformer T on random pairs, (1 - local NCC^2) + 0.3 L_grad.
* S1 ``StylePretrainTrainer`` - style encoder by volumetric MoCo (positives: x warped by frozen T onto another
  anatomy) + LS-GAN prior on the codes.
* S2 ``JointTrainer`` - style encoder, appearance model A and flow model F by Eq. 11.
* S3 :func:`extract_flows` - phi_t = F(A(b, E_k(t)) -> t) for every unlabelled training image t.
* S4 ``FlowAAETrainer`` - adversarial auto-encoder of those flows.
* S5 :func:`generate_pairs` - X = G(n_flow) o A(b, n_style), Y = G(n_flow) o b_seg (NIfTI + datalist + PNG grid).
* S6 (bundle ``train.json``) - a 3D U-Net on the generated pairs; :func:`evaluate_atlas_registration` is the
  "Reg." row (atlas labels warped by the SST flow).

Images enter every network in [-1, 1] (volumes are preprocessed to [0, 1] and mapped by 2x - 1); generated images
are stored in [0, 1]. Fields are voxel displacements (``common.registration.fields``). The atlas / pool preparation,
the optional affine pre-alignment and the random pair / flow datasets live in :mod:`common.engines.sst_data`
(re-exported here for the configs).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch import nn

from common.engines.progress import progress
from common.engines.sst_data import (
    FlowDataset,
    RandomPairDataset,
    SSTData,
    align_to_atlas,
    color_jitter,
    entry_name,
    plain_tensor,
    prepare_sst_data,
    to_subject_grid,
)
from common.evaluation.metrics import per_label_metrics
from common.evaluation.report import rows_from_metrics, write_report
from common.io import atomic_json_dump, atomic_torch_save, atomic_write_bytes, save_nifti
from common.losses.adversarial import lsgan_discriminator_loss, lsgan_generator_loss, sample_normal_prior
from common.losses.image_similarity import SSIML1Loss, flow_gradient_l1
from common.losses.moco import VolumetricMoCoLoss, momentum_update, warp_to_anatomy
from common.networks.appearance import AppearanceModel
from common.networks.flow_aae import FlowAAE
from common.networks.sst_registration import FlowNet
from common.registration.affine import affine_ddf
from common.registration.fields import resize_ddf, warp, warp_labels

logger = logging.getLogger(__name__)

__all__ = [
    "SSTData",
    "prepare_sst_data",
    "align_to_atlas",
    "to_subject_grid",
    "RandomPairDataset",
    "FlowDataset",
    "color_jitter",
    "prepare_dict_batch",
    "RegistrationPretrainTrainer",
    "StylePretrainTrainer",
    "JointTrainer",
    "FlowAAETrainer",
    "StageRunner",
    "StageWeightSaver",
    "load_stage_weights",
    "style_codes",
    "extract_flows",
    "load_flows",
    "evaluate_atlas_registration",
    "sample_flow_codes",
    "generate_pairs",
    "save_generation_grid",
    "run_stages",
    "dice_by_label",
]


# ------------------------------------------------------------------------------------------------------------- data
def prepare_dict_batch(batchdata: Mapping, device: torch.device | str | None = None, non_blocking: bool = False, **kw):
    """``prepare_batch`` for dict batches: every tensor moved to ``device``."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batchdata.items()}


# ---------------------------------------------------------------------------------------------------------- engines
class _SSTTrainer(Trainer):
    """Shared constructor: a MONAI ``Trainer`` over dict batches; subclasses' ``_train_step`` returns scalar losses."""

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        non_blocking: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_dict_batch,
            key_metric=key_train_metric,
            handlers=train_handlers,
            decollate=False,
        )

    def _iteration(self, engine: Engine, batchdata: Any) -> list[dict] | None:
        """One-element list around the step's losses: the decollated form MONAI's handler defaults read.

        ``from_engine(["loss"], first=True)`` (e.g. ``--tracking mlflow``) then works unchanged.
        """
        output = self._train_step(engine, batchdata)
        return None if output is None else [output]

    def _train_step(self, engine: Engine, batchdata: Any) -> dict | None:
        raise NotImplementedError

    def _batch(self, engine: Engine, batchdata: Mapping) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        return engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class RegistrationPretrainTrainer(_SSTTrainer):
    """S0: T(moving=source -> fixed=target) minimising ncc_loss(warped', target') + grad_weight * L_grad.

    ``ncc_loss`` is MONAI's ``LocalNormalizedCrossCorrelationLoss`` (= -mean local NCC^2), so the objective equals the
    authors' (1 - NCC^2) + 0.3 L_grad up to the constant; ' means mapped to [0, 1].
    """

    def __init__(
        self,
        device,
        max_epochs: int,
        train_data_loader,
        network: FlowNet,
        optimizer: torch.optim.Optimizer,
        ncc_loss: nn.Module,
        grad_weight: float = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, **kwargs)
        self.network, self.optimizer, self.ncc_loss, self.grad_weight = network, optimizer, ncc_loss, grad_weight

    def _train_step(self, engine: RegistrationPretrainTrainer, batchdata: Mapping) -> dict:
        batch = self._batch(engine, batchdata)
        engine.network.train()
        warped, ddf = engine.network.register(batch["source"], batch["target"])
        similarity = engine.ncc_loss((warped + 1) / 2, (batch["target"] + 1) / 2)
        smooth = flow_gradient_l1(ddf)
        loss = similarity + engine.grad_weight * smooth
        _step(engine.optimizer, loss)
        return {"loss": loss.item(), "similarity": similarity.item(), "grad": smooth.item()}


class _StyleMixin:
    """MoCo + latent LS-GAN bookkeeping shared by S1 and S2."""

    style_encoder: nn.Module
    key_encoder: nn.Module
    moco: VolumetricMoCoLoss
    registration_net: nn.Module
    discriminator: nn.Module
    d_optimizer: torch.optim.Optimizer
    momentum: float
    discriminator_weight: float

    def _moco_and_adversarial(self, query_image: torch.Tensor, anatomy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(L_MoCo, L_G, q): query = E_q(x), positive = E_k(T(x -> anatomy)); the key encoder moves first."""
        momentum_update(self.key_encoder, self.style_encoder, self.momentum)
        with torch.no_grad():
            key = self.key_encoder(warp_to_anatomy(self.registration_net, query_image, anatomy))
        query = self.style_encoder(query_image)
        loss_moco = self.moco(query, key)
        loss_g = lsgan_generator_loss(self.discriminator(query))
        return loss_moco, loss_g, query

    def _discriminator_step(self, query: torch.Tensor) -> torch.Tensor:
        prior = sample_normal_prior(query.shape[0], query.shape[1], normalize=True, device=query.device)
        loss_d = self.discriminator_weight * lsgan_discriminator_loss(
            self.discriminator(prior), self.discriminator(query.detach())
        )
        _step(self.d_optimizer, loss_d)
        return loss_d


class StylePretrainTrainer(_StyleMixin, _SSTTrainer):
    """S1: L = L_MoCo + adversarial_weight * L_G on E_q (paper: lambda_3 = 0.1; code 0.5), then a D_style step.

    Pairs share their intensity jitter, so source and its positive key differ only in anatomy.
    """

    def __init__(
        self,
        device,
        max_epochs: int,
        train_data_loader,
        style_encoder: nn.Module,
        key_encoder: nn.Module,
        moco_loss: VolumetricMoCoLoss,
        registration_net: nn.Module,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        adversarial_weight: float = 0.1,
        discriminator_weight: float = 0.5,
        momentum: float = 0.99,
        **kwargs,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, **kwargs)
        self.style_encoder, self.key_encoder, self.moco = style_encoder, key_encoder, moco_loss
        self.registration_net, self.discriminator = registration_net, discriminator
        self.optimizer, self.d_optimizer = optimizer, d_optimizer
        self.adversarial_weight, self.discriminator_weight, self.momentum = (
            adversarial_weight,
            discriminator_weight,
            momentum,
        )

    def _train_step(self, engine: StylePretrainTrainer, batchdata: Mapping) -> dict:
        batch = self._batch(engine, batchdata)
        engine.style_encoder.train()
        loss_moco, loss_g, query = engine._moco_and_adversarial(batch["source"], batch["target"])
        loss = loss_moco + engine.adversarial_weight * loss_g
        _step(engine.optimizer, loss)
        loss_d = engine._discriminator_step(query)
        return {"loss": loss.item(), "moco": loss_moco.item(), "adv_g": loss_g.item(), "adv_d": loss_d.item()}


class JointTrainer(_StyleMixin, _SSTTrainer):
    """S2, one step of Eq. 11 (spec 5.2) on a pair (s, t) with independent jitter:

    c_s, c_t = E(s), E(t); s~ = A(s, c_t); (y, phi) = F(s~ -> t);
    L = L_MoCo(query t, key T(t -> s)) + lambda_1 (L(A(s~, c_s), s) + L(A(t, c_t), t))
        + lambda_2 (L(y, t) + lambda_reg L_grad(phi)) + lambda_3 L_G,
    then a D_style step. ``style_code_source="key"`` (authors' code) takes the codes from the momentum encoder
    without gradient, so E learns only from MoCo and the prior; ``"query"`` (paper Fig. 2) back-propagates the
    appearance and flow losses into E. Ablations: ``use_appearance=False`` (s~ = s, no L_app; Table 2 "w/o L_app")
    and ``joint_optimisation=False`` (F registers a detached s~, so A learns from L_app only and F from L_flow only;
    Table 2 "w/o joint opt.").
    """

    def __init__(
        self,
        device,
        max_epochs: int,
        train_data_loader,
        style_encoder: nn.Module,
        key_encoder: nn.Module,
        moco_loss: VolumetricMoCoLoss,
        registration_net: nn.Module,
        discriminator: nn.Module,
        appearance: AppearanceModel,
        flow_net: FlowNet,
        optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        image_loss: nn.Module | None = None,
        lambda_appearance: float = 5.0,
        lambda_flow: float = 1.0,
        lambda_adversarial: float = 0.1,
        lambda_reg: float = 0.1,
        discriminator_weight: float = 0.5,
        momentum: float = 0.99,
        style_code_source: str = "key",
        use_appearance: bool = True,
        joint_optimisation: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, **kwargs)
        if style_code_source not in ("key", "query"):
            raise ValueError(f"style_code_source must be 'key' or 'query', got {style_code_source!r}")
        self.style_encoder, self.key_encoder, self.moco = style_encoder, key_encoder, moco_loss
        self.registration_net, self.discriminator = registration_net, discriminator
        self.appearance, self.flow_net = appearance, flow_net
        self.optimizer, self.d_optimizer = optimizer, d_optimizer
        self.image_loss = image_loss if image_loss is not None else SSIML1Loss()
        self.lambda_appearance, self.lambda_flow = lambda_appearance, lambda_flow
        self.lambda_adversarial, self.lambda_reg = lambda_adversarial, lambda_reg
        self.discriminator_weight, self.momentum = discriminator_weight, momentum
        self.style_code_source = style_code_source
        self.use_appearance, self.joint_optimisation = bool(use_appearance), bool(joint_optimisation)

    def losses(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Appearance and flow terms of Eq. 11 for one pair (no MoCo, no optimiser step)."""
        if self.style_code_source == "key":
            with torch.no_grad():
                code_s, code_t = self.key_encoder(source), self.key_encoder(target)
        else:
            code_s, code_t = self.style_encoder(source), self.style_encoder(target)
        zero = source.new_zeros(())
        if self.use_appearance:
            restyled = self.appearance(source, code_t)
            cycle = self.image_loss(self.appearance(restyled, code_s), source)
            identity = self.image_loss(self.appearance(target, code_t), target)
        else:
            restyled, cycle, identity = source, zero, zero
        moving = restyled if self.joint_optimisation else restyled.detach()
        warped, ddf = self.flow_net.register(moving, target)
        recon = self.image_loss(warped, target)
        smooth = flow_gradient_l1(ddf)
        app = cycle + identity
        flow = recon + self.lambda_reg * smooth
        return {
            "appearance": app,
            "cycle": cycle,
            "identity": identity,
            "flow": flow,
            "recon": recon,
            "grad": smooth,
            "weighted": self.lambda_appearance * app + self.lambda_flow * flow,
        }

    def _train_step(self, engine: JointTrainer, batchdata: Mapping) -> dict:
        batch = self._batch(engine, batchdata)
        for module in (engine.style_encoder, engine.appearance, engine.flow_net):
            module.train()
        source, target = batch["source"], batch["target"]
        terms = engine.losses(source, target)
        loss_moco, loss_g, query = engine._moco_and_adversarial(target, source)
        loss = loss_moco + terms["weighted"] + engine.lambda_adversarial * loss_g
        _step(engine.optimizer, loss)
        loss_d = engine._discriminator_step(query)
        out = {k: v.item() for k, v in terms.items() if k != "weighted"}
        out.update(loss=loss.item(), moco=loss_moco.item(), adv_g=loss_g.item(), adv_d=loss_d.item())
        return out


class FlowAAETrainer(_SSTTrainer):
    """S4 (spec 4.8): AE loss L1(phi^, phi) + (1 - SSIM(b o phi^, b o phi)) + adversarial_weight (D(z) - 1)^2;
    D loss adversarial_weight [(D(z) - 0)^2 + (D(n) - 1)^2] with n ~ N(0, I) of the latent shape.

    ``base_image`` ([1, 1, *S] in [-1, 1]) is warped at its own size; flows of another ``field_size`` are resampled.
    """

    def __init__(
        self,
        device,
        max_epochs: int,
        train_data_loader,
        flow_aae: FlowAAE,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        base_image: torch.Tensor,
        adversarial_weight: float = 0.05,
        ssim_loss: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, **kwargs)
        self.flow_aae, self.discriminator = flow_aae, discriminator
        self.optimizer, self.d_optimizer = optimizer, d_optimizer
        self.base_image = base_image
        self.adversarial_weight = adversarial_weight
        self.ssim_loss = ssim_loss if ssim_loss is not None else SSIML1Loss(l1_weight=0.0, ssim_weight=1.0)

    def _warp_base(self, ddf: torch.Tensor) -> torch.Tensor:
        size = self.base_image.shape[2:]
        if tuple(ddf.shape[2:]) != tuple(size):
            ddf = resize_ddf(ddf, size)
        return warp(self.base_image.to(ddf), ddf)

    def _train_step(self, engine: FlowAAETrainer, batchdata: Mapping) -> dict:
        flow = self._batch(engine, batchdata)["flow"]
        engine.flow_aae.train()
        z = engine.flow_aae.encode(flow)
        recon = engine.flow_aae.decode(z)
        l1 = (recon - flow).abs().mean()
        ssim = engine.ssim_loss(engine._warp_base(recon), engine._warp_base(flow))
        loss_g = lsgan_generator_loss(engine.discriminator(z))
        loss = l1 + ssim + engine.adversarial_weight * loss_g
        _step(engine.optimizer, loss)
        prior = torch.randn_like(z)
        loss_d = engine.adversarial_weight * lsgan_discriminator_loss(
            engine.discriminator(prior), engine.discriminator(z.detach())
        )
        _step(engine.d_optimizer, loss_d)
        return {
            "loss": loss.item(),
            "l1": l1.item(),
            "ssim": ssim.item(),
            "adv_g": loss_g.item(),
            "adv_d": loss_d.item(),
        }


class StageRunner(_SSTTrainer):
    """A one-iteration MONAI trainer around a non-training stage (S3 flows, S5 generation, "Reg." evaluation).

    Every stage config then exposes the same ``train#trainer`` (handlers, MLflow tracking, ``check_properties``).
    ``function`` is called once; its return value is kept in ``engine.state.stage_result``. Distributed: rank 0 alone
    runs it (the stages write shared files) and the other ranks wait at a barrier (their result is None). No loss,
    so ``engine.state.output`` is None (loss handlers such as MLflow's skip it).
    """

    def __init__(
        self,
        device,
        function: Callable[[], Any],
        max_epochs: int = 1,
        train_data_loader: Sequence | None = None,
        **kwargs,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader if train_data_loader is not None else [0], **kwargs)
        self.function = function

    def _train_step(self, engine: StageRunner, batchdata: Any) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            engine.state.stage_result = None
        else:
            engine.state.stage_result = engine.function()
        if distributed:
            torch.distributed.barrier()
        return None


# -------------------------------------------------------------------------------------------------- stage weights
class StageWeightSaver:
    """Write ``{name: state_dict}`` of ``modules`` to ``path`` atomically when the engine completes.

    The file marks the stage as finished (``run_stages`` skips a stage whose file exists), so it is written only at
    COMPLETED, never mid-stage (mid-stage resume uses ``common.engines.checkpoint.ResumableCheckpointHandler``).
    """

    def __init__(self, path: str | Path, modules: Mapping[str, nn.Module], extra: Mapping | None = None) -> None:
        self.path = Path(path)
        self.modules = dict(modules)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path:
        state = {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in self.modules.items()}
        state.update(self.extra)
        return atomic_torch_save(state, self.path)


def load_stage_weights(
    path: str | Path, modules: Mapping[str, nn.Module], map_location: Any = "cpu", stage: str = "the previous stage"
) -> dict[str, nn.Module]:
    """Load the entries of a stage file into ``modules`` (strict); a missing file names the stage to run first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run {stage} first (or point the config id at its weight file).")
    state = torch.load(path, map_location=map_location, weights_only=True)
    missing = [k for k in modules if k not in state]
    if missing:
        raise KeyError(f"{path} has no entries {missing}; it holds {sorted(state)}")
    for name, module in modules.items():
        module.load_state_dict(state[name])
    return dict(modules)


# ------------------------------------------------------------------------------------------------------ S3 + Reg.
@torch.no_grad()
def style_codes(encoder: nn.Module, images: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Style codes [N, dim] of [0, 1] volumes ([1, *S] each)."""
    encoder.eval()
    return torch.cat([encoder(img[None].to(device) * 2 - 1) for img in images]).cpu()


@torch.no_grad()
def _base_to_target_flow(
    base: torch.Tensor, target: torch.Tensor, key_encoder: nn.Module, appearance: nn.Module | None, flow_net: FlowNet
) -> torch.Tensor:
    """phi = F(A(b, E_k(t)) -> t) for [-1, 1] tensors [1, 1, *S]; without appearance model F(b -> t)."""
    moving = appearance(base, key_encoder(target)) if appearance is not None else base
    return flow_net(torch.cat([moving, target], dim=1))


@torch.no_grad()
def extract_flows(
    data: SSTData,
    key_encoder: nn.Module,
    appearance: nn.Module | None,
    flow_net: FlowNet,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    native_pose: bool = True,
) -> Path:
    """S3: save phi_t (``[D, *S]`` voxels, float32) for every pool image as ``<name>.pt``; ``index.json`` last.

    ``index.json`` is the stage's completion marker. ``appearance=None`` is the "w/o appearance model" ablation. With
    affine pre-alignment and ``native_pose`` the stored flow is the whole atlas -> native-image field (the affine
    composed with the flow to the aligned image), so the flow AAE and the generated pairs keep the pool's pose
    variation; without ``native_pose`` it is the flow to the aligned image only, and the generated pairs stay in the
    atlas's pose (config ``unet_space="atlas"``: the U-Net then segments aligned images,
    `common.engines.sst_inference.AtlasSpaceInferer`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in (key_encoder, appearance, flow_net):
        if m is not None:
            m.eval()
    base = data.base_image[None].to(device) * 2 - 1
    files = []
    pool = enumerate(zip(data.names, data.images, strict=True))
    for i, (name, image) in progress(pool, "S3 extracting flows", total=len(data.names)):
        ddf = _base_to_target_flow(base, image[None].to(device) * 2 - 1, key_encoder, appearance, flow_net)
        if data.matrices is not None and native_pose:
            ddf = to_subject_grid(ddf, data.matrices[i])
        atomic_torch_save(plain_tensor(ddf[0]).cpu(), out / f"{name}.pt")
        files.append(f"{name}.pt")
    return atomic_json_dump(
        {"base": data.base_name, "spatial_size": list(data.spatial_size), "flows": files}, out / "index.json"
    )


def load_flows(index_path: str | Path) -> list[torch.Tensor]:
    """Flows listed in an ``extract_flows`` index."""
    index_path = Path(index_path)
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: run the flow extraction stage (S3) first.")
    index = json.loads(index_path.read_text())
    return [torch.load(index_path.parent / f, map_location="cpu", weights_only=True) for f in index["flows"]]


@torch.no_grad()
def evaluate_atlas_registration(
    data: SSTData,
    entries: Sequence[Mapping],
    transform: Callable,
    key_encoder: nn.Module,
    appearance: nn.Module | None,
    flow_net: FlowNet,
    output_dir: str | Path,
    device: torch.device | str = "cpu",
    name: str = "registration_report",
) -> dict:
    """Row "Reg." (Table 2a): segment each test image by warping the atlas labels with F(A(b, E_k(t)) -> t).

    With affine pre-alignment (``data.affine_options``) each test image is aligned to the atlas as the pool was, the
    flow registers the atlas to the aligned image, and the two are composed so the labels land in the test image's
    own grid.

    Scores Dice/HD95/ASSD per label (voxel units when spacing is unknown) with ``common.evaluation``; returns the
    summary and writes ``<name>.csv|json|md`` to ``output_dir``.
    """
    for m in (key_encoder, appearance, flow_net):
        if m is not None:
            m.eval()
    base = data.base_image[None].to(device) * 2 - 1
    base_label = data.base_label[None].to(device)
    rows = []
    for entry in progress(entries, "atlas registration (Reg.)", total=len(entries)):
        loaded = transform({"image": entry["image"], "label": entry["label"]})
        target = plain_tensor(loaded["image"]).float()[None].to(device)
        matrix = None
        if data.affine_options is not None:
            matrix = align_to_atlas(target.cpu(), data.base_image, data.base_label, data.affine_options).to(device)
            target = warp(target, affine_ddf(matrix, target.shape[2:]))
        ddf = _base_to_target_flow(base, target * 2 - 1, key_encoder, appearance, flow_net)
        if matrix is not None:
            ddf = to_subject_grid(ddf, matrix)
        pred = warp_labels(base_label, ddf)[0, 0].cpu()
        gt = plain_tensor(loaded["label"])[0].long()
        result = per_label_metrics(pred, gt, data.labels)
        rows += rows_from_metrics(entry_name(entry), result)
    json_path = write_report(rows, output_dir, name)[1]
    return json.loads(Path(json_path).read_text())["summary"]


# ------------------------------------------------------------------------------------------------------------ S5
@torch.no_grad()
def sample_flow_codes(
    flow_aae: FlowAAE,
    num: int,
    latent_shape: Sequence[int],
    sampler: str = "prior",
    flows: Sequence[torch.Tensor] | None = None,
    mix: float = 0.3,
    rng: np.random.Generator | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    offset: int = 0,
) -> torch.Tensor:
    """Flow codes [num, *latent_shape]: ``"prior"`` n ~ N(0, I) (paper Eq. 12), or ``"latent-mix"`` (authors' code):
    z = (Enc(phi1) + a Enc(phi2) + b Enc(phi3)) / (1 + a + b), phi1 = flows[(offset + i) % n] cycling over the stored
    flows, phi2, phi3 random, a, b ~ U(0, mix). ``flows`` must already be at the AAE field size.
    """
    if sampler == "prior":
        return sample_normal_prior(num, tuple(latent_shape), device=device, generator=generator)
    if sampler != "latent-mix":
        raise ValueError(f"flow code sampler must be 'prior' or 'latent-mix', got {sampler!r}")
    if not flows:
        raise ValueError("the 'latent-mix' sampler needs the stored flows of stage S3")
    rng = rng if rng is not None else np.random.default_rng(0)
    flow_aae.eval()
    n = len(flows)
    codes = []
    for i in range(num):
        j, k = (int(v) for v in rng.integers(0, n, size=2))
        a, b = (float(v) for v in rng.uniform(0.0, mix, size=2))
        z = flow_aae.encode(torch.stack([flows[(offset + i) % n], flows[j], flows[k]]).to(device))
        codes.append((z[0] + a * z[1] + b * z[2]) / (1.0 + a + b))
    return torch.stack(codes)


def save_generation_grid(
    images: np.ndarray, path: str | Path, row_title: str = "style code", col_title: str = "flow code", dpi: int = 60
) -> Path:
    """PNG grid of 2D slices ``images[row, col, H, W]`` (rows: style codes, columns: flow codes; paper Fig. 8)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{row_title} {r}", fontsize=6)
            if r == rows - 1:
                ax.set_xlabel(f"{col_title} {c}", fontsize=6)
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _middle_slice(volume: torch.Tensor, axis: int) -> np.ndarray:
    return volume.select(axis, volume.shape[axis] // 2).cpu().numpy()


@torch.no_grad()
def generate_pairs(
    data: SSTData,
    appearance: nn.Module | None,
    flow_aae: FlowAAE,
    out_dir: str | Path,
    num_pairs: int = 1850,
    field_size: Sequence[int] | None = None,
    style_dim: int = 128,
    flow_code_sampler: str = "prior",
    flows: Sequence[torch.Tensor] | None = None,
    mix: float = 0.3,
    label_mask_threshold: float | None = 0.01,
    validation_entries: Sequence[Mapping] | None = None,
    grid_size: int = 4,
    grid_axis: int = -1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Path:
    """S5 (Eq. 12): X = G(n_flow) o A(b, n_style) (stored in [0, 1]), Y = G(n_flow) o b_seg (nearest neighbour).

    n_style is a normalised Gaussian (style codes live on the unit sphere). ``appearance=None`` skips restyling (the
    "w/o appearance model" ablation); an appearance model trained on another site gives the cross-site setting.
    Labels are set to 0 where X < ``label_mask_threshold`` (authors' code; None disables). Writes
    ``imagesTr/genNNNNN.nii.gz``, ``labelsTr/...``, ``generation_grid.png`` (rows: style codes, columns: flow codes,
    same codes everywhere) and, last, ``datalist.json`` (the stage marker) whose "validation" section holds
    ``validation_entries`` (real labelled images for model selection).
    """
    out = Path(out_dir)
    generator = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    size = data.spatial_size
    field_size = tuple(field_size) if field_size is not None else size
    latent_shape = flow_aae.latent_shape(field_size)
    if flows is not None and flows and tuple(flows[0].shape[1:]) != field_size:
        flows = [resize_ddf(f[None], field_size)[0] for f in flows]
    base = data.base_image[None].to(device) * 2 - 1
    base_label = data.base_label[None].to(device)
    flow_aae.eval()
    if appearance is not None:
        appearance.eval()

    def decode(z: torch.Tensor) -> torch.Tensor:
        ddf = flow_aae.decode(z.to(device))
        return resize_ddf(ddf, size) if tuple(ddf.shape[2:]) != size else ddf

    def restyle(style: torch.Tensor) -> torch.Tensor:
        return appearance(base, style.to(device)) if appearance is not None else base

    entries = []
    for i in progress(range(int(num_pairs)), "S5 generating pairs"):
        z = sample_flow_codes(flow_aae, 1, latent_shape, flow_code_sampler, flows, mix, rng, generator, device, i)
        style = sample_normal_prior(1, style_dim, normalize=True, generator=generator)
        ddf = decode(z)
        image = (warp(restyle(style), ddf) * 0.5 + 0.5).clamp(0.0, 1.0)
        label = warp_labels(base_label, ddf)
        if label_mask_threshold is not None:
            label = torch.where(image < label_mask_threshold, torch.zeros_like(label), label)
        name = f"gen{i:05d}.nii.gz"
        save_nifti(image[0, 0].cpu().numpy().astype(np.float32), data.affine, out / "imagesTr" / name)
        save_nifti(label[0, 0].cpu().numpy().astype(np.uint8), data.affine, out / "labelsTr" / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    # Fig. 8: one row per style code, one column per flow code
    styles = sample_normal_prior(grid_size, style_dim, normalize=True, generator=generator)
    codes = sample_flow_codes(flow_aae, grid_size, latent_shape, flow_code_sampler, flows, mix, rng, generator, device)
    axis = grid_axis % len(size)
    grid = np.stack(
        [
            np.stack(
                [
                    _middle_slice((warp(restyle(styles[r : r + 1]), decode(codes[c : c + 1])) * 0.5 + 0.5)[0, 0], axis)
                    for c in range(grid_size)
                ]
            )
            for r in range(grid_size)
        ]
    )
    save_generation_grid(np.clip(grid, 0.0, 1.0), out / "generation_grid.png")
    labels = {"0": "background", **{str(k): v for k, v in data.labels.items()}}
    datalist = {
        "name": "sst_generated",
        "description": (
            f"{num_pairs} SST image-label pairs from atlas {data.base_name}; flow codes: {flow_code_sampler}; "
            f"appearance model: {'yes' if appearance is not None else 'no'}"
        ),
        "labels": labels,
        "modality": {"0": "MR"},
        "tensorImageSize": "3D",
        "training": entries,
        "validation": [dict(e) for e in (validation_entries or [])],
    }
    return atomic_json_dump(datalist, out / "datalist.json")


# --------------------------------------------------------------------------------------------------------- run_all
def run_stages(
    stages: Sequence[Mapping[str, Any]],
    overrides: Mapping[str, Any] | None = None,
    meta_file: str | None = None,
    logging_file: str | None = None,
    stop_after: str | None = None,
) -> dict[str, dict]:
    """Run bundle stages in order, skipping every stage whose ``output`` file already exists.

    Each stage is ``{"name", "configs": [config files layered in order], "output": marker file, "run_id": "run"}``;
    it runs in-process as a MONAI ``ConfigWorkflow`` with ``overrides``. An interrupted stage leaves no marker and is
    redone (resuming from its own resumable checkpoint where it has one). Returns ``{name: {"status", "seconds"}}``.
    """
    from monai.bundle import ConfigWorkflow

    report: dict[str, dict] = {}
    for stage in stages:
        name, output = stage["name"], Path(stage["output"])
        if output.exists():
            logger.info("stage %s already finished (%s exists): skipped", name, output)
            report[name] = {"status": "skipped", "seconds": 0.0}
        else:
            logger.info("stage %s: running %s", name, stage["configs"])
            start = time.perf_counter()
            kwargs = dict(overrides or {})
            workflow = ConfigWorkflow(
                config_file=list(stage["configs"]),
                meta_file=meta_file,
                logging_file=logging_file,
                workflow_type="train",
                run_id=stage.get("run_id", "run"),
                **kwargs,
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            del workflow
            gc.collect()
            if not output.exists():
                raise RuntimeError(f"stage {name} ran but did not write its output {output}")
            report[name] = {"status": "done", "seconds": round(time.perf_counter() - start, 2)}
        if stop_after is not None and name == stop_after:
            break
    return report


def dice_by_label(summary: Mapping) -> dict[str, float]:
    """``{label: mean Dice, ..., "mean": mean over cases of the per-case mean over labels}`` from a report summary
    (``common.evaluation.report.summarize`` format, or a report JSON holding it under "summary")."""
    summary = summary.get("summary", summary)
    out = {g: float(m["dice"]["mean"]) for g, m in summary["groups"].items() if m.get("dice", {}).get("n", 0)}
    over = summary.get("mean_over_groups", {}).get("dice")
    out["mean"] = float(over["mean"]) if over else float(np.mean(list(out.values())))
    return out
