"""hpcflow.io"""
