"""hpcflow.flows"""
