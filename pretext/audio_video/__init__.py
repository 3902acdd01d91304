"""Audio-visual and video tasks: audio-visual correspondence, cross-modal InfoNCE, temporal order, odd-one-out, and their shared audio and frame parts."""
