"""What runs around the methods' layer solves: allocation rules (per-target sparsities) and block refiners."""
