"""hpcflow.analysis"""
