"""The datasets handprop knows: where their files come from and how to check them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a dataset.

    ``sha256`` and ``size`` are those of the UNCOMPRESSED content: a copy recompressed
    with another gzip (Debian's packages are) or stored uncompressed still verifies, and
    decompression never goes past ``size``. A file without a pinned ``sha256`` is never
    used. ``gz_md5`` is the checksum the maintainers publish for their own ``.gz`` file:
    recorded for reference only, as any recompression changes it.
    """

    name: str  # e.g. "train-images-idx3-ubyte" (found with or without ".gz")
    sha256: str | None = None
    size: int | None = None
    gz_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    class_names: tuple[str, ...]
    files: tuple[FileSpec, ...] = ()  # train images, train labels, test images, test labels
    mirrors: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    builtin: bool = False  # shipped inside a package (no files to find)
    #: how a picture is made into one of its images (see handprop.images.IMAGE_PREPS):
    #: "mnist", a 20x20 box in 28x28 centred by mass, or "fill", the frame filled
    image_prep: str = "mnist"


@dataclass
class Dataset:
    """A loaded dataset: images (N, H, W) uint8 and labels (N,) int64.

    For datasets with an official split, the ``n_train`` training samples come first.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    image_shape: tuple[int, int]
    pixel_max: float
    n_train: int | None
    source: str
    files: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


MNIST_FILES = (
    FileSpec(
        "train-images-idx3-ubyte",
        sha256="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        size=47040016,
        gz_md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    FileSpec(
        "train-labels-idx1-ubyte",
        sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        size=60008,
        gz_md5="d53e105ee54ea40749a09fcbcd1e9432",
    ),
    FileSpec(
        "t10k-images-idx3-ubyte",
        sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        size=7840016,
        gz_md5="9fb629c4189551a2d022fa330f9573f3",
    ),
    FileSpec(
        "t10k-labels-idx1-ubyte",
        sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        size=10008,
        gz_md5="ec29112dd5afa0611ce80d1b7f02629c",
    ),
)

# Fashion-MNIST's maintainers publish only the md5 of their .gz files. The content
# checksums were computed from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1,
# whose files carry the upstream deflate streams under a new gzip header: putting the
# upstream header back (the file name, mtime 2017-08-31 10:50 UTC) gives each
# published gz_md5 exactly, so this is the upstream content.
FASHION_FILES = (
    FileSpec(
        "train-images-idx3-ubyte",
        sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        size=47040016,
        gz_md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    FileSpec(
        "train-labels-idx1-ubyte",
        sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        size=60008,
        gz_md5="25c81989df183df01b3e8a0aad5dffbe",
    ),
    FileSpec(
        "t10k-images-idx3-ubyte",
        sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        size=7840016,
        gz_md5="bef4ecab320f06d8554ea6380940ec79",
    ),
    FileSpec(
        "t10k-labels-idx1-ubyte",
        sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        size=10008,
        gz_md5="bb300cfdad3c16e7a12a480ee83cd310",
    ),
)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST handwritten digits, 28x28, 60000 train + 10000 test",
        tuple(str(i) for i in range(10)),
        MNIST_FILES,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "Zalando's Fashion-MNIST clothing images, 28x28, 60000 train + 10000 test",
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        FASHION_FILES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        image_prep="fill",  # each product trimmed and scaled to fill the 28x28 frame
    ),
    "digits": DatasetSpec(
        "digits",
        "scikit-learn's bundled 8x8 digits (1797 images, offline)",
        tuple(str(i) for i in range(10)),
        builtin=True,
        image_prep="fill",  # 32x32 bitmaps filled by the digit, then 4x4 blocks counted
    ),
}
