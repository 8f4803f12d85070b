"""Image files on disk: ImageFolder listing, sizes from headers, path lists, and finding the
files a decoder refuses (``verify_images``: DALI's decoder, imported on first use).
``rule.py`` holds the one rule of what a usable image file is, which every tool applies."""
from dali_relabel.images.files import IMAGE_EXTENSIONS, find_images, read_image_sizes
from dali_relabel.images.path_lists import read_path_list, write_bad_list
from dali_relabel.images.rule import DALI_FORMATS, read_image_header

__all__ = ["DALI_FORMATS", "IMAGE_EXTENSIONS", "find_images", "read_image_header",
           "read_image_sizes", "read_path_list", "verify_images", "write_bad_list"]


def __getattr__(name: str):
    if name == "verify_images":
        from dali_relabel.images.verify import verify_images
        return verify_images
    raise AttributeError(f"module 'dali_relabel.images' has no attribute {name!r}")
