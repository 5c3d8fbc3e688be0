import os

import torch

# Tiny models gain nothing from more threads, and two processes with several OpenMP threads each
# on a 2-core machine slow each other down many times over. UNCLIP_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("UNCLIP_TEST_THREADS", "2")))
