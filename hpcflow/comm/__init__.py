"""hpcflow.comm"""
