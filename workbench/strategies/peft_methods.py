"""Parameter-efficient methods from the ``peft`` library, injected into the backbone only.

Every class here only translates its arguments into a ``peft`` config: LoRA (with DoRA, PiSSA
and EVA initialisations), LoHa, LoKr, IA3, VeRA, OFT and BOFT. peft freezes the backbone's own
weights; neck, decoder and head stay trainable. All of them merge into the base weights.

The ``PeftModel`` (around peft's tuner object: ``LoraModel``, ``LoHaModel``, ``VeraModel``, ...)
is kept as the backbone's unregistered ``peft_model`` attribute: the adapter layers sit in the
backbone in place, so state-dict keys stay the backbone's own (no ``base_model.model.`` prefix),
while merging (``merge_and_unload``) and EVA initialisation go through peft itself.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
from peft import (
    BOFTConfig,
    EvaConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    LoraGAConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    VeraConfig,
    initialize_lora_eva_weights,
    preprocess_loraga,
)
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.tuners_utils import check_target_module_exists
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import InitBatches, Strategy

ATTENTION = ["attn.qkv", "attn.proj"]


def linear_names(module: nn.Module) -> list[str]:
    """Distinct ``parent.child`` suffixes of the Linear layers, e.g. ``attn.qkv``, ``mlp.fc1``, and
    the last names of the plain (ungrouped) convolutions, e.g. ``_expand_conv``, ``conv1``."""
    names = {".".join(n.split(".")[-2:]) for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    names |= {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if type(m) is nn.Conv2d and m.groups == 1}
    return sorted(names)


class PeftStrategy(Strategy):
    """Adapt ``model.backbone`` in place with a ``PeftModel`` built from :meth:`peft_config`."""

    target_modules: list[str]

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        config = self.peft_config()
        if not any(check_target_module_exists(config, name) for name, _ in backbone.named_modules()):
            names = ", ".join(linear_names(backbone)) or "none (use frozen, full, bitfit, norm or ssf)"
            raise UserInputError(
                f"{self.name} target_modules {self.target_modules} match no layer of the backbone. "
                f"Linear and plain conv layers it has: {names}."
            )
        try:
            peft_model = PeftModel(backbone, config)
        except ValueError as err:
            raise UserInputError(f"{self.name} cannot adapt this backbone: {err}") from None
        except AssertionError:  # smp's TF-"same" convs with asymmetric padding (stride 2) refuse copies
            raise UserInputError(
                f"{self.name} target_modules {self.target_modules} include a stride-2 EfficientNet conv with "
                "TensorFlow-style asymmetric padding (the stem or a depthwise conv), which peft cannot adapt: "
                f"target plain convs instead ({', '.join(linear_names(backbone))})"
            ) from None
        object.__setattr__(backbone, "peft_model", peft_model)  # not a child: keys stay the backbone's

    def merged(self, model: BackboneModel) -> BackboneModel:
        plain = copy.deepcopy(model)
        peft_model: PeftModel = plain.backbone.peft_model
        del plain.backbone.peft_model
        peft_model.merge_and_unload()  # folds and unwraps the adapter layers of plain.backbone in place
        return plain


LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga")
DATA_INITS = ("eva", "corda", "lora_ga")  # initialisations that read training batches


class LoRA(PeftStrategy):
    """Low-rank adapters (LoRA), or weight-decomposed DoRA with ``use_dora: true``.

    ``init``: ``default`` (A random, B zero), ``gaussian``, ``pissa`` (principal singular
    vectors; moves them out of the frozen base weights, so adapter-only exports need the
    PiSSA-modified base; ``pissa_niter_4`` etc. for fast randomized SVD), ``olora``, ``eva``
    (data-driven: SVD of the layers' inputs over a few training batches; ranks stay uniform so
    checkpoints load into the model the config builds) or ``corda`` (CorDA, Yang et al. 2024,
    arXiv:2406.05223: each weight is decomposed by the covariance of its inputs over a few
    training batches; ``corda_method: ipm`` puts the leading components in the adapters for fast
    adaptation, ``kpm`` the trailing ones to preserve what the model knows; the residual stays in
    the frozen base weights, so the adapted model starts equal to the original, and adapter-only
    exports need the CorDA-modified base, as with PiSSA) or ``lora_ga`` (LoRA-GA, Wang et al.
    2024, arXiv:2407.05000: the adapters start from the SVD of each weight's gradient of the
    training loss, averaged over a few labelled training batches, so the first steps move like full
    fine-tuning; peft's ``preprocess_loraga``; the initial product is subtracted from the frozen
    base weights, so the model starts equal to the original; Linear targets only).
    """

    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        use_dora: bool = False,
        init: str = "default",
        eva_batches: int = 4,
        corda_method: Literal["ipm", "kpm"] = "ipm",
    ) -> None:
        """
        Args:
            rank: rank of the update matrices.
            alpha: scaling numerator (the update is scaled by ``alpha / rank``).
            dropout: dropout on the adapter input.
            target_modules: Linear layers to adapt, by name suffix; default attention
                ``attn.qkv`` and ``attn.proj``.
            use_dora: DoRA (magnitude + direction) instead of plain LoRA.
            init: initialisation of the adapters (see the class docstring).
            eva_batches: training batches the ``eva``, ``corda`` and ``lora_ga`` initialisations read.
            corda_method: ``ipm`` (instruction-previewed: leading components adapt) or ``kpm``
                (knowledge-preserved: trailing components adapt).
        """
        if init.split("_niter_")[0] not in LORA_INITS:
            raise UserInputError(f"lora init {init!r} is not one of {', '.join(LORA_INITS)} (or pissa_niter_<n>).")
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = list(target_modules or ATTENTION)
        self.use_dora = use_dora
        self.init = init
        self.eva_batches = eva_batches
        self.corda_method = corda_method
        self.name = "dora" if use_dora else "lora"
        self.init_batches = eva_batches if init in DATA_INITS else 0

    def prepare(self, model: BackboneModel) -> None:
        if self.init == "lora_ga":  # peft would silently give other layers its default init
            config = self.peft_config()
            others = [n for n, m in model.backbone.named_modules()
                      if check_target_module_exists(config, n) and not isinstance(m, nn.Linear)]
            if others:
                raise UserInputError(f"lora init lora_ga adapts Linear layers only; target_modules {self.target_modules} "
                                     f"match {len(others)} other layers (e.g. {others[0]}): use init default or eva")
        super().prepare(model)

    def peft_config(self) -> LoraConfig:
        # corda and lora_ga adapters are made from training batches by initialize(); until then, default ones
        init = {"default": True, "gaussian": "gaussian", "corda": True, "lora_ga": True}.get(self.init, self.init)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_dora=self.use_dora,
            init_lora_weights=init,
            eva_config=EvaConfig(rho=1.0) if self.init == "eva" else None,
        )

    @torch.no_grad()
    def initialize(self, model: BackboneModel, data: InitBatches) -> None:
        """EVA: set each ``lora_A`` to the top right-singular vectors of its layer's inputs
        ``(tokens, D)``, collected over the batches' inputs with the adapters disabled (peft's
        ``initialize_lora_eva_weights``; ``rho=1`` keeps every layer at ``rank``). CorDA: see
        :meth:`initialize_corda`."""
        if self.init == "corda":
            self.initialize_corda(model.backbone, data.inputs)
        if self.init == "lora_ga":
            self.initialize_lora_ga(model, data)
        if self.init != "eva":
            return
        initialize_lora_eva_weights(
            model.backbone.peft_model,
            data.inputs,
            forward_fn=lambda peft_model, image: peft_model.get_base_model().forward_features(image),
            prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=lambda layer_input, _inputs, _name: layer_input[0].flatten(0, -2),
            show_progress_bar=False,
        )


    def initialize_corda(self, backbone: nn.Module, batches: list[Tensor]) -> None:
        """CorDA: on a plain copy of ``backbone``, peft's ``preprocess_corda`` collects each target
        layer's input covariance over ``batches`` and builds the adapters and residual weights;
        they are copied into ``backbone`` in place (the optimizer keeps its parameters)."""
        plain = plain_copy(backbone)
        config = dataclasses.replace(self.peft_config(), init_lora_weights="corda",
                                     corda_config=CordaConfig(corda_method=self.corda_method))
        samples = [one for images in batches for one in images.split(1)]  # peft's hooks take (tokens, D) inputs
        preprocess_corda(plain, config, run_model=lambda: [plain.forward_features(one) for one in samples])
        adopt_adapters(backbone, plain, config)

    def initialize_lora_ga(self, model: BackboneModel, data: InitBatches) -> None:
        """LoRA-GA: with a plain copy of the backbone in the model, peft's ``preprocess_loraga``
        averages each target weight's gradient of the training loss over the batches; the
        adapters and residual weights built from it are copied into the backbone in place."""
        backbone, plain = model.backbone, plain_copy(model.backbone)
        config = dataclasses.replace(self.peft_config(), init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        model.backbone = plain  # the task's loss runs through the copy
        try:
            with torch.enable_grad():
                preprocess_loraga(plain, config, train_step=lambda: [data.loss(i).backward() for i in range(len(data))])
        finally:
            model.backbone = backbone
        adopt_adapters(backbone, plain, config)


def plain_copy(backbone: nn.Module) -> nn.Module:
    """A copy of a peft-adapted ``backbone`` without its adapter layers (base weights as they are)."""
    plain = copy.deepcopy(backbone)
    peft_copy: PeftModel = plain.peft_model
    del plain.peft_model
    peft_copy.unload()
    return plain


def adopt_adapters(backbone: nn.Module, plain: nn.Module, config: LoraConfig) -> None:
    """Adapt ``plain`` by ``config`` (peft builds data-initialised adapters and residual base
    weights from what its preprocessing left on the layers) and copy its weights into the adapted
    ``backbone`` in place, so the optimizer keeps its parameters."""
    PeftModel(plain, config)
    backbone.load_state_dict(plain.state_dict())


class _RankAlphaPeft(PeftStrategy):
    """A peft method configured by ``rank``, ``alpha`` and target modules only."""

    config_class: type[PeftConfig]

    def __init__(self, rank: int = 8, alpha: float = 16, target_modules: list[str] | None = None) -> None:
        """
        Args:
            rank: rank of the low-rank factors.
            alpha: scaling numerator.
            target_modules: Linear layers to adapt by name suffix (default attention).
        """
        self.rank = rank
        self.alpha = alpha
        self.target_modules = list(target_modules or ATTENTION)

    def peft_config(self) -> PeftConfig:
        return self.config_class(r=self.rank, alpha=self.alpha, target_modules=self.target_modules)


class LoHa(_RankAlphaPeft):
    """LoHa: low-rank Hadamard-product updates (peft ``LoHaConfig``)."""

    name = "loha"
    config_class = LoHaConfig


class LoKr(_RankAlphaPeft):
    """LoKr: Kronecker-product updates (peft ``LoKrConfig``)."""

    name = "lokr"
    config_class = LoKrConfig


class IA3(PeftStrategy):
    """IA3: learned vectors rescaling the outputs of the attention and the inputs of the MLP's
    second layer (peft ``IA3Config``)."""

    name = "ia3"

    def __init__(self, target_modules: list[str] | None = None, feedforward_modules: list[str] | None = None) -> None:
        """
        Args:
            target_modules: layers that get a scaling vector (default ``attn.qkv``, ``mlp.fc2``).
            feedforward_modules: the subset scaled on the input side (default ``mlp.fc2``).
        """
        self.target_modules = list(target_modules or ["attn.qkv", "mlp.fc2"])
        self.feedforward_modules = list(feedforward_modules or ["mlp.fc2"])

    def peft_config(self) -> IA3Config:
        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules)


class VeRA(PeftStrategy):
    """VeRA: frozen random low-rank matrices shared by all layers, trained scaling vectors.

    The shared matrices are buffers of every adapted layer (``...vera_A.default``).
    """

    name = "vera"

    def __init__(self, rank: int = 64, target_modules: list[str] | None = None, seed: int = 0) -> None:
        """
        Args:
            rank: rank of the shared random projections.
            target_modules: Linear layers to adapt by name suffix (default attention).
            seed: seed of the shared random projections.
        """
        self.rank = rank
        self.target_modules = list(target_modules or ATTENTION)
        self.seed = seed

    def peft_config(self) -> VeraConfig:
        return VeraConfig(r=self.rank, target_modules=self.target_modules, projection_prng_key=self.seed)

    def prepare(self, model: BackboneModel) -> None:
        super().prepare(model)
        model.backbone._register_load_state_dict_pre_hook(load_wrapped_vera_layout)


def load_wrapped_vera_layout(state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Load-state-dict pre-hook: checkpoints written while VeRA's ``VeraModel`` was registered as
    the backbone (every backbone key under ``model.``, plus the model-level copies of the shared
    projections ``vera_A.default`` / ``vera_B.default``) → the backbone's own layout, in place."""
    if prefix + "vera_A.default" not in state_dict:
        return
    for shared in ("vera_A.default", "vera_B.default"):
        state_dict.pop(prefix + shared, None)
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        state_dict[prefix + key[len(prefix + "model."):]] = state_dict.pop(key)


class OFT(PeftStrategy):
    """OFT: a learned block-diagonal orthogonal rotation of each adapted layer's weights."""

    name = "oft"

    def __init__(self, block_size: int = 32, target_modules: list[str] | None = None) -> None:
        """
        Args:
            block_size: size of each orthogonal block; must divide the layers' input width.
            target_modules: Linear layers to adapt by name suffix (default attention).
        """
        self.block_size = block_size
        self.target_modules = list(target_modules or ATTENTION)

    def peft_config(self) -> OFTConfig:
        return OFTConfig(r=0, oft_block_size=self.block_size, target_modules=self.target_modules)


class BOFT(PeftStrategy):
    """BOFT: orthogonal fine-tuning with butterfly-factorised rotations."""

    name = "boft"

    def __init__(
        self, block_size: int = 8, butterfly_factor: int = 1, target_modules: list[str] | None = None
    ) -> None:
        """
        Args:
            block_size: size of each orthogonal block; must divide the layers' input width.
            butterfly_factor: number of butterfly factors (1 is plain block-diagonal OFT).
            target_modules: Linear layers to adapt by name suffix (default attention).
        """
        self.block_size = block_size
        self.butterfly_factor = butterfly_factor
        self.target_modules = list(target_modules or ATTENTION)

    def peft_config(self) -> BOFTConfig:
        return BOFTConfig(
            boft_block_size=self.block_size,
            boft_n_butterfly_factor=self.butterfly_factor,
            target_modules=self.target_modules,
        )
