"""hpcflow.sampling"""
