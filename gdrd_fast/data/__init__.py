"""Face data: identity folders, insightface RecordIO (.rec/.idx), low-resolution degradation, insightface pairs, splits, synthetic faces."""
from .degrade import RESOLUTIONS, degrade
from .folder import IdentityFolderDataset
from .images import decode_image, encode_png, from_uint8, load_image, to_uint8
from .recordio import (RecordDataset, RecordFile, RecordIOError, RecordWriter, open_dataset, pack_folder,
                       pack_record, unpack_record)
from .pairs_bin import UnsafePickleError, load_pairs_bin, read_pairs_bin, restricted_loads, write_pairs_bin
from .splits import IdentificationSplit, read_split_file
from .synthetic import SyntheticFaces, sample_pairs, write_synthetic_dataset
from .transforms import CrossResolutionDataset, CrossResolutionViews

__all__ = ["RESOLUTIONS", "degrade", "IdentityFolderDataset", "decode_image", "encode_png", "from_uint8",
           "load_image", "to_uint8", "UnsafePickleError", "load_pairs_bin", "read_pairs_bin", "restricted_loads",
           "write_pairs_bin", "IdentificationSplit", "read_split_file", "SyntheticFaces", "sample_pairs",
           "write_synthetic_dataset", "CrossResolutionDataset", "CrossResolutionViews", "RecordDataset", "RecordFile",
           "RecordIOError", "RecordWriter", "open_dataset", "pack_folder", "pack_record", "unpack_record"]
