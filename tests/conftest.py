import torch

# Two OpenMP threads on a loaded 2-core machine made tiny forward passes up to 1000x slower.
torch.set_num_threads(1)
