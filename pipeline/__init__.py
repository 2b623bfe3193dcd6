"""The pipeline's library: what the five stages in `stages/` import (see docs/layout.md)."""
