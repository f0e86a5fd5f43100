"""Stage 5: evaluation by the DreamBench protocol (paper sec. 4.1): DINO, CLIP-I, CLIP-T, PRES, DIV."""
