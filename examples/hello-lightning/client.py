"""train.py made federated: the lines marked "# FL" are the only ones changed.

diff train.py client.py
"""

import argparse
import logging
import warnings

import pytorch_lightning as pl
from model import LitNet

import client_agent.lightning as flare  # FL
from data import DigitsDataModule

# Lightning's start-up banner and its num_workers hint are noise for 512 in-memory images.
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*|.*treespec.*")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="site-1")
    parser.add_argument("--num-sites", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    flare.patch(trainer)  # FL
    site = flare.get_site_name()  # FL
    dm = DigitsDataModule(site, args.num_sites)
    model = LitNet(lr=args.lr)
    while flare.is_running():  # FL
        trainer.validate(model, datamodule=dm, verbose=False)  # FL
        trainer.fit(model, datamodule=dm)  # FL
    accuracy = trainer.validate(model, datamodule=dm, verbose=False)[0]["accuracy"]
    print(f"{site}: final accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
