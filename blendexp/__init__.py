"""blendexp: training and evaluation framework for blendshape-guided, ID-consistent face generation."""
