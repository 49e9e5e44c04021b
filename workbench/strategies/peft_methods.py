"""Parameter-efficient methods from the ``peft`` library, injected into the backbone only.

Every class here only translates its arguments into a ``peft`` config: LoRA (with DoRA, PiSSA
and EVA initialisations), LoHa, LoKr, IA3, VeRA, OFT and BOFT. peft freezes the backbone's own
weights; neck, decoder and head stay trainable. All of them merge into the base weights.
"""

from __future__ import annotations

import copy

import torch
from peft import (
    BOFTConfig,
    EvaConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    VeraConfig,
    get_eva_state_dict,
    inject_adapter_in_model,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.tuners.vera import VeraModel
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy

ATTENTION = ["attn.qkv", "attn.proj"]


def linear_names(module: nn.Module) -> list[str]:
    """Distinct ``parent.child`` suffixes of the Linear layers, e.g. ``attn.qkv``, ``mlp.fc1``, and
    the last names of the plain (ungrouped) convolutions, e.g. ``_expand_conv``, ``conv1``."""
    names = {".".join(n.split(".")[-2:]) for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    names |= {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if type(m) is nn.Conv2d and m.groups == 1}
    return sorted(names)


def merge_adapters(module: nn.Module) -> None:
    """Merge every peft adapter layer of ``module`` into its base layer and unwrap it, in place."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer.get_base_layer())


class PeftStrategy(Strategy):
    """Inject the adapters described by :meth:`peft_config` into ``model.backbone``."""

    target_modules: list[str]

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def inject(self, backbone: nn.Module) -> nn.Module:
        """Add the adapters to ``backbone`` (in place) and return the module to use."""
        return inject_adapter_in_model(self.peft_config(), backbone)

    def prepare(self, model: BackboneModel) -> None:
        try:
            model.backbone = self.inject(model.backbone)
        except ValueError as err:
            message = str(err)
            if "not found" in message or "Target module" in message:
                names = ", ".join(linear_names(model.backbone)) or "none (use frozen, full, bitfit, norm or ssf)"
                raise UserInputError(
                    f"{self.name} target_modules {self.target_modules} match no layer of the backbone. "
                    f"Linear and plain conv layers it has: {names}."
                ) from None
            raise UserInputError(f"{self.name} cannot adapt this backbone: {message}") from None
        except AssertionError:  # smp's TF-"same" convs with asymmetric padding (stride 2) refuse copies
            raise UserInputError(
                f"{self.name} target_modules {self.target_modules} include a stride-2 EfficientNet conv with "
                "TensorFlow-style asymmetric padding (the stem or a depthwise conv), which peft cannot adapt: "
                f"target plain convs instead ({', '.join(linear_names(model.backbone))})"
            ) from None

    def merged(self, model: BackboneModel) -> BackboneModel:
        plain = copy.deepcopy(model)
        merge_adapters(plain.backbone)
        if isinstance(plain.backbone, BaseTuner):
            plain.backbone = plain.backbone.model
        return plain


LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva")


class LoRA(PeftStrategy):
    """Low-rank adapters (LoRA), or weight-decomposed DoRA with ``use_dora: true``.

    ``init``: ``default`` (A random, B zero), ``gaussian``, ``pissa`` (principal singular
    vectors; moves them out of the frozen base weights, so adapter-only exports need the
    PiSSA-modified base; ``pissa_niter_4`` etc. for fast randomized SVD), ``olora``, or ``eva``
    (data-driven: SVD of the layers' inputs over a few training batches; ranks stay uniform so
    checkpoints load into the model the config builds).
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
            eva_batches: training batches the ``eva`` initialisation reads.
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
        self.name = "dora" if use_dora else "lora"
        self.init_batches = eva_batches if init == "eva" else 0

    def peft_config(self) -> LoraConfig:
        init = {"default": True, "gaussian": "gaussian"}.get(self.init, self.init)
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
    def initialize(self, model: BackboneModel, batches: list[Tensor]) -> None:
        """EVA: set each ``lora_A`` to the top right-singular vectors of its layer's inputs."""
        if self.init != "eva":
            return
        plain = copy.deepcopy(model.backbone)
        merge_adapters(plain)
        plain.__dict__.pop("peft_config", None)  # a plain module again, for peft's EVA
        components = get_eva_state_dict(
            plain,
            batches,
            self.peft_config(),
            forward_fn=lambda backbone, image: backbone.forward_features(image),
            prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=lambda layer_input, _inputs, _name: layer_input[0].flatten(0, -2),
            show_progress_bar=False,
        )
        for name, module in model.backbone.named_modules():
            if name in components:
                module.lora_A["default"].weight.copy_(components[name][: self.rank])


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

    The shared matrices live on peft's ``VeraModel``, which wraps the backbone (its keys gain a
    ``model.`` prefix until merged).
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

    def inject(self, backbone: nn.Module) -> nn.Module:
        return VeraModel(backbone, self.peft_config(), "default")


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
