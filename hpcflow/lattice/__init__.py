"""hpcflow.lattice"""
