"""Generic block paging between pinned host RAM and the GPU. Never imports ComfyUI or flux2_core."""
