"""The evaluate stage, by the DreamBench protocol (paper sec. 4.1): DINO, CLIP-I, CLIP-T, PRES, DIV; the
learning check, checkpoint scores and the safety check."""
