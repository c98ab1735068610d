"""Dataset recipes: a downloaded corpus (MSP-Podcast, IEMOCAP, a plain folder) to a manifest
(`id, path, split`, then label columns) in one call."""

from .common import LabelRange, PrepareSummary
from .folder import SplitRule, prepare_folder
from .iemocap import prepare_iemocap
from .msp_podcast import prepare_msp_podcast

__all__ = ["LabelRange", "PrepareSummary", "SplitRule", "prepare_folder", "prepare_iemocap",
           "prepare_msp_podcast"]
