"""What training, evaluation and bench read: a store or a manifest -> ids, labels, a loader
(`source`) for the model that runs on them, and the checks that store and model belong together."""

from __future__ import annotations

from dataclasses import dataclass, field

from cachegen.errors import StoreMismatch


@dataclass
class Inputs:
    """A store (states at `cache_layer`) or a manifest (audio) and the labels table beside it."""

    table: object  # pyarrow.Table of labels: the store's manifest table, the manifest, or --labels
    table_name: str  # how errors name the table
    reader: object | None = None  # CacheReader when reading a store
    paths: dict[str, str] | None = None  # id -> audio file when reading a manifest
    location: str | None = None  # the store as given
    unusable: set[str] = field(default_factory=set)  # audio ids `source` found unusable
    preload: bool | None = False  # CacheSource's: keep states in memory (None: when they fit)
    shared: object | None = None  # a CacheSource opened already, shared by several runs (ser sweep)

    @classmethod
    def open(cls, *, from_cache: str | None = None, manifest: str | None = None, labels: str | None = None,
             cache_dir: str | None = None, audio_root: str | None = None,
             preload: bool | None = False, shared=None) -> Inputs:
        """Open a store (`from_cache`) or a manifest; `labels` replaces the table. Utterances the
        store's build recorded as failed are left out of the table (named in a warning);
        `preload` is passed to the store's loader (headtrain.data.CacheSource). `shared`: that
        loader, opened already for `from_cache` (a sweep opens the store once for all runs, so
        preloaded states are read once in all)."""
        from cachegen.manifest import load_manifest

        from .labels import drop_failed, read_labels

        if from_cache:
            from cachegen import open_cache

            reader = shared.reader if shared is not None else open_cache(from_cache, cache_dir=cache_dir)
            inputs = cls(table=reader.table, table_name=f"{from_cache} (manifest table)", reader=reader,
                         location=from_cache, preload=preload, shared=shared)
        else:
            loaded = load_manifest(manifest, audio_root=audio_root)
            inputs = cls(table=loaded.table, table_name=manifest,
                         paths={u.id: u.path for u in loaded.utterances})
        if labels:
            inputs.table, inputs.table_name = read_labels(labels), labels
        if inputs.reader is not None:
            inputs.table = drop_failed(inputs.table, inputs.meta)
        return inputs

    @property
    def from_store(self) -> bool:
        return self.reader is not None

    @property
    def meta(self) -> dict | None:
        return self.reader.meta if self.reader is not None else None

    @property
    def cache_layer(self) -> int:
        """The layer whose output the inputs are: the store's, or 0 (the model embeds audio)."""
        return self.meta["layers"] if self.from_store else 0

    @property
    def model_id(self) -> str:
        """The base model to use when none is named: the store's, or the documented default."""
        from cachegen.encoder import DEFAULT_MODEL

        return self.meta["model_id"] if self.from_store else DEFAULT_MODEL

    @property
    def ids(self) -> list[str]:
        """Ids that have inputs, in the store's or the manifest's order."""
        return list(self.reader.ids) if self.from_store else [u for u in self.paths if u not in self.unusable]

    @property
    def available(self) -> set[str]:
        """Ids that have inputs (states or an audio file)."""
        return set(self.reader.ids) if self.from_store else set(self.paths) - self.unusable

    def source(self, model, feature_extractor):
        """The loader batches read from: states from the store, or audio decoded and normalised
        for `model` (whose geometry gives the frame counts)."""
        from .data import AudioSource, CacheSource
        from .labels import drop_unusable

        if self.from_store:
            return self.shared or CacheSource(self.reader, preload=self.preload)
        source = AudioSource(self.paths, model, feature_extractor)
        # files whose header cannot be read, or too short for one frame: left out, named
        if self.table is not None:
            self.table = drop_unusable(self.table, source)
        self.unusable = set(source.unusable)
        return source

    def pooled_source(self, layers: tuple[int, ...] | None = None):
        """The loader of each utterance's pooled means of `layers` (None: every layer the
        store pooled), for `--strategy weighted-sum`: no frame states are read.

        Raises:
            ConfigError: the inputs are audio, not a store.
            StoreMismatch: the store holds no pooled statistics, or not of `layers`.
        """
        from cachegen.errors import ConfigError

        from .data import PooledSource

        if not self.from_store:
            raise ConfigError("--strategy weighted-sum trains on a store's pooled means: pass "
                              "--from-cache STORE (built with --pooled-layers all)")
        return PooledSource(self.reader, layers, preload=self.preload)

    def check_model(self, loaded) -> None:
        """A store must have been built from `loaded` (a cachegen.encoder.LoadedModel).

        Raises:
            StoreMismatch: other weights, another config, or other geometry.
        """
        if self.from_store:
            check_store_model(self.reader, loaded)

    def check_run(self, run_dir: str, spec) -> None:
        """A store must hold states of the base model the run (its `ModelSpec`) trained on.

        Raises:
            StoreMismatch: the weights differ.
        """
        if self.from_store and spec.model_sha256 and self.meta["model_sha256"] != spec.model_sha256:
            raise StoreMismatch(f"{run_dir} was trained on weights sha256 {spec.model_sha256[:12]}…, "
                                f"the store on {self.meta['model_sha256'][:12]}…: they do not belong together")


def check_store_model(reader, loaded) -> None:
    """The store `reader` reads must have been built from `loaded` (a LoadedModel).

    Raises:
        StoreMismatch: other weights, another config, or other geometry, naming the store.
    """
    location, meta = reader.location, reader.meta
    if meta["model_sha256"] != loaded.weights_sha256:
        raise StoreMismatch(
            f"{location} was built from weights sha256 {meta['model_sha256'][:12]}… but model "
            f"'{loaded.model_id}' has {loaded.weights_sha256[:12]}…; pass --model with the checkpoint "
            "the store was built from")
    if meta.get("model_config_sha256", loaded.config_sha256) != loaded.config_sha256:
        raise StoreMismatch(
            f"{location} was built with another model config (activation, norms or geometry) than "
            f"'{loaded.model_id}' has, though the weights match; pass --model with the checkpoint "
            "folder the store was built from")
    for field_name, value in (("hidden_size", loaded.hidden_size), ("num_hidden_layers", loaded.num_layers),
                              ("do_stable_layer_norm", loaded.stable_layer_norm)):
        if meta.get(field_name, False) != value:  # do_stable_layer_norm may be absent: False
            raise StoreMismatch(f"{location}: store has {field_name}={meta.get(field_name, False)}, model "
                                f"'{loaded.model_id}' has {value}")
