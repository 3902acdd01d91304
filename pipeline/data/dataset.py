"""A shard dataset opened once per command: its manifest, each split's checked shard URLs and its
decoders, handed to whatever needs them (the driver's checks, the examples figure, the training
loop, the online monitor, eval and export) instead of each re-deriving them from a root path."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.decode import ImageDecoder, decoder_for
from pipeline.data.shards import read_manifest, split_urls
from pipeline.data.storage import ShardUrl, check_urls


@dataclass
class Dataset:
    root: str
    manifest: dict
    allow_shell_urls: bool = False  # data.allow_shell_urls: `pipe:` shard URLs run shell commands
    _urls: dict[str, list[ShardUrl]] = field(default_factory=dict, repr=False)
    _decoders: dict[tuple, ImageDecoder] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str, allow_shell_urls: bool = False) -> "Dataset":
        """Reads the manifest under `root` (a folder or a URL); raises naming the place when there is none."""
        return cls(str(root), read_manifest(root), allow_shell_urls)

    @classmethod
    def for_data(cls, data) -> "Dataset":
        """The dataset of a config's `data` section (its `root` and `allow_shell_urls`)."""
        return cls.open(data.root, data.allow_shell_urls)

    @property
    def channels(self) -> int:
        return self.manifest["channels"]

    @property
    def classes(self) -> list[str]:
        return self.manifest.get("classes") or []

    def urls(self, split: str) -> list[ShardUrl]:
        """The split's shard URLs, checked once (local files exist, `pipe:` allowed, fsspec protocols known)."""
        if split not in self._urls:
            self._urls[split] = check_urls(split_urls(self.root, self.manifest, split), self.allow_shell_urls)
        return self._urls[split]

    def decoder(self, split: str, image_size: int = 0, require_label: bool = False) -> ImageDecoder:
        """`decoder_for` this manifest (the colour mode and `split`'s channel statistics), built once per arguments."""
        key = (split, image_size, require_label)
        if key not in self._decoders:
            self._decoders[key] = decoder_for(self.manifest, split, image_size, require_label)
        return self._decoders[key]
