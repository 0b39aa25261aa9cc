"""What is measured: the interfaces.

Generators, backbones and techniques, the model a stack transforms, stacks and model specs.
"""
