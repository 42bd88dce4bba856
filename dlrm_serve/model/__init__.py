"""The DLRM itself: its stages, weights files, int8 tables and checkpoint import (torch)."""
