"""The paper's network (U-Net on a ResNet18 encoder), its encoder weights and its loss."""
